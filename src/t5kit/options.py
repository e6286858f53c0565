"""Config dataclasses as command-line flags and TOML recipes: the one home for the field-with-help
(`option`) that `cli.py` turns into a flag, for the precedence defaults < implied < recipe < flags
(`resolve`), and for rendering a config back into the command that reproduces it (`to_flags`).
Every job's and the server's config uses it; stdlib only, so every part may import it.
"""

from __future__ import annotations

from dataclasses import field, fields


def option(help: str, **kw):
    """A dataclass field whose `help` becomes its flag's --help text."""
    return field(metadata={"help": help}, **kw)


def resolve(cls, recipe: str | None = None, values: dict | None = None):
    """cls(defaults < cls.implied(...) < TOML recipe < values). Recipe keys are the flag names
    (dashes or underscores); an unknown key is an error naming the file."""
    import tomllib

    known = {f.name for f in fields(cls)}
    from_recipe = {}
    if recipe:
        try:
            with open(recipe, "rb") as f:
                from_recipe = {k.replace("-", "_"): v for k, v in tomllib.load(f).items()}
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"{recipe}: cannot read TOML recipe ({e})") from None
        unknown = sorted(set(from_recipe) - known)
        if unknown:
            raise ValueError(f"{recipe}: unknown keys {unknown}; expected flags of this command's --help")
    given = {**from_recipe, **(values or {})}
    implied = getattr(cls, "implied", lambda _: {})(given)
    return cls(**{**implied, **given})


def to_flags(cfg, skip: tuple[str, ...] = ()) -> list[str]:
    """The command-line flags that reproduce `cfg` (fields that differ from their defaults)."""
    out = []
    defaults = type(cfg)()
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in skip or value == getattr(defaults, f.name) or value is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag)
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out
