"""The Python half of scripts/gpu_check.sh: the standard library, torch, and t5kit from src/ (no
other package, so that it runs with whatever Python the GPU machine has).

    python scripts/gpu_report.py env              one JSON line: Python, torch, CUDA, GPU; exit 3 and
                                                  one sentence instead when there is no CUDA GPU
    python scripts/gpu_report.py shapes PRESET... the presets whose random fp32 encoder checkpoint
                                                  fits half the free disk (temp folder) and memory
    python scripts/gpu_report.py report DIR       DIR/gpu_report.json from what gpu_check.sh left in
                                                  DIR, and a summary of at most 10 lines; exit 1 when
                                                  a test failed or a part failed or ran out of time
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import xml.etree.ElementTree as ET

NO_GPU = 3  # exit status of `env` on a machine without a CUDA GPU
TIMED_OUT = (124, 137)  # timeout(1): the limit passed (SIGTERM), or the process had to be killed


def env() -> int:
    import torch
    info = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
            "cuda": torch.version.cuda, "gpu": None, "gpu_count": 0}
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU on this machine (torch {torch.__version__}, {sys.executable}): nothing to check")
        return NO_GPU
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=props.name, gpu_count=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}",
                gpu_memory_gib=round(props.total_memory / 2**30, 1))
    print(json.dumps(info))
    return 0


def available_memory() -> int:
    """Bytes of memory available to a new process (Linux's MemAvailable: free plus reclaimable cache)."""
    with open("/proc/meminfo", encoding="ascii") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def shapes(presets: list[str]) -> int:
    """benchmarks/encode.py --encoder-only writes a random encoder checkpoint in fp32 (4 bytes a
    parameter) to a temp folder and holds it in memory while saving: the presets whose checkpoint
    leaves half of the free disk and of the available memory, in the order given (the first one
    if none does: the encode part's own error then says why)."""
    import torch

    import t5kit
    room = min(shutil.disk_usage(tempfile.gettempdir()).free, available_memory()) / 2
    fit = []
    for name in presets:
        with torch.device("meta"):  # sizes only
            n_params = sum(p.numel() for p in t5kit.T5Encoder(t5kit.get_preset(name)).parameters())
        if 4 * n_params <= room:
            fit.append(name)
    print(" ".join(fit or presets[:1]))
    return 0


def junit_cases(path: str) -> dict[str, dict]:
    """pytest's --junitxml -> {test id: {"outcome", "seconds"[, "message"]}}; a collection error is
    a case with outcome "error" named after its module."""
    if not os.path.isfile(path):
        return {}
    cases = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}" if case.get("classname") else case.get("name")
        row = {"outcome": "passed", "seconds": round(float(case.get("time") or 0), 2)}
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                row["outcome"] = {"failure": "failed"}.get(child.tag, child.tag)
                row["message"] = (child.get("message") or "")[:500]
        cases[name] = row
    return cases


def json_lines(path: str) -> list[dict]:
    """The JSON lines a benchmark printed (anything else on stdout is left out)."""
    rows = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("{"):
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass  # a line cut short by the part's time limit
    return rows


def parts(path: str) -> dict[str, dict]:
    """parts.tsv (name, exit status, seconds, limit, command) -> {name: {...}}."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            name, rc, seconds, limit, command = line.rstrip("\n").split("\t")
            out[name] = {"rc": int(rc), "seconds": int(seconds), "limit_s": int(limit),
                         "timed_out": int(rc) in TIMED_OUT, "command": command, "log": f"{name}.log"}
    return out


def _status(part: dict) -> str:
    if part["timed_out"]:
        return f"timed out after {part['limit_s']} s"
    return f"exit {part['rc']}"


def summary(report: dict) -> list[str]:
    """At most 10 lines: the machine, the tests, one line per benchmark row, what went wrong."""
    e, p, bench = report["env"], report["parts"], report["benchmarks"]
    lines = [f"gpu_check: {e['gpu']} ({e['gpu_memory_gib']} GiB), torch {e['torch']}, CUDA {e['cuda']}, "
             f"Python {e['python']}"]
    outcomes = [c["outcome"] for c in report["tests"].values()]
    counts = {k: outcomes.count(k) for k in ("passed", "failed", "error", "skipped")}
    lines.append(f"tests (-m gpu): {counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
                 f"{counts['skipped']} skipped in {p['tests']['seconds']} s")
    generate = bench.get("generate", [])
    if generate:  # one line for the cases: new tok/s (ratios to each contender)
        lines.append(f"generate {generate[0]['shape']} {generate[0]['dtype']}: " + "; ".join(
            f"{r['case']} {r['t5kit_tok_s']:.0f} tok/s (" + ", ".join(
                f"{v}x {k.removeprefix('t5kit_over_')}" for k, v in r.items() if k.startswith("t5kit_over_")) + ")"
            for r in generate))
    for r in bench.get("encode", []):
        lines.append(f"encode {r['shape']} {r['dtype']} b{r['batch']} x {r['length']}: t5kit {r['t5kit_tok_s']:.0f} "
                     f"tok/s ({r['t5kit_pct_peak']}% of peak), {r['ratio']}x transformers; peak memory "
                     f"{r['t5kit_peak_mem_mb']:.0f} vs {r['transformers_peak_mem_mb']:.0f} MB")
    train = bench.get("train", [])
    if train:
        lines.append(f"train {train[0]['shape']} bf16 b{train[0]['batch']}, tok/s (compile s): "
                     + ", ".join(f"{r['case']} {r['tok_s']} ({r['compile_s']})" for r in train))
    for r in bench.get("long", []):  # issue 20: LongT5's encoder
        lines.append(f"long {r['preset']} {r['dtype']} {r['length']} tokens: t5kit {r['t5kit_tok_s']:.0f} tok/s, "
                     f"{r.get('ratio')}x transformers; peak memory " + " vs ".join(
                         f"{v:.0f}" for k, v in r.items() if k.endswith("_mb") and "peak" in k) + " MB")
    lora = bench.get("lora", [])  # issue 21: LoRA steps and generation with the adapter
    if lora:
        lines.append("lora " + "; ".join(
            f"{r['kind']} step {r['speedup']}x peft" if r["bench"] == "lora_step" else
            f"generation with adapter {r['t5kit_adapter_vs_peft_adapter']}x peft's unmerged" for r in lora
            if r["bench"] in ("lora_step", "lora_generate")))
    failed = [name for name, c in report["tests"].items() if c["outcome"] in ("failed", "error")]
    broken = [f"{name} ({_status(part)}, {part['log']})" for name, part in p.items() if part["rc"]
              and not (name == "tests" and failed and part["rc"] == 1)]
    problems = [f"test {name}" for name in failed] + broken
    lines = lines[:8]  # room for the verdict and what went wrong
    if problems:
        more = f"; {len(problems) - 6} more" if len(problems) > 6 else ""
        lines.append("problems: " + "; ".join(problems[:6]) + more)
    lines.append(("OK: every GPU test passed and every benchmark ran" if report["ok"] else "FAILED")
                 + f"; {report['path']}")
    return lines


def report(folder: str) -> int:
    with open(os.path.join(folder, "env.json"), encoding="utf-8") as f:
        info = json.load(f)
    done = parts(os.path.join(folder, "parts.tsv"))
    tests = junit_cases(os.path.join(folder, "tests.xml"))
    bench = {name: json_lines(os.path.join(folder, f"{name}.out")) for name in done if name != "tests"}
    ok = all(part["rc"] == 0 for part in done.values()) and bool(tests) and all(
        c["outcome"] in ("passed", "skipped") for c in tests.values())
    path = os.path.join(folder, "gpu_report.json")
    result = {"ok": ok, "env": info, "parts": done, "tests": tests, "benchmarks": bench, "path": path}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print("\n".join(summary(result)))
    return 0 if ok else 1


def main(argv: list[str]) -> int:
    if argv[:1] == ["env"]:
        return env()
    if argv[:1] == ["shapes"] and len(argv) > 1:
        return shapes(argv[1:])
    if argv[:1] == ["report"] and len(argv) == 2:
        return report(argv[1])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
