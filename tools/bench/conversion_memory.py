#!/usr/bin/env python
"""Peak memory of Hugging Face checkpoint conversion (tools/convert_checkpoint.py).

Builds a random TinyLlama-shaped 1.1B LlamaForCausalLM in bf16 (hidden 2048, 22 layers,
32 heads, 4 key/value groups, ffn 5632, vocabulary 32000) in a temporary directory, imports it
at TP1 and exports it back at each ``--max-shard-size``, every conversion a subprocess of the
tool, and prints the peak resident memory (VmHWM) of each process: the tool and, for the
import, its worker. ``tree max`` is the exact peak over the process tree (``wait4``; the per-process
figures are polled, so they can miss the last moments); ``bare`` is a process that only imports
the libraries the conversion uses.

    .venv/bin/python tools/bench/conversion_memory.py [--quick] [--max-shard-size 5GB 500MB]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "convert_checkpoint.py")
GIB = 1024 ** 3
SHAPES = {
    "tinyllama-1.1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                           intermediate_size=5632, vocab_size=32000),
    "quick": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, vocab_size=128),
}


def build_model(directory: str, shape: str) -> None:
    """A random bf16 LlamaForCausalLM of ``shape`` saved in ``directory`` (run in a subprocess of
    its own: a child forked from a large process would count the parent's pages in its peak)."""
    import torch
    import transformers

    config = transformers.LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, tie_word_embeddings=False,
                                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {shape}, {params / 1e6:.1f}M parameters, bf16 ({params * 2 / 1e9:.3f} GB)", flush=True)


def _children(pid: int) -> List[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _status(pid: int) -> Tuple[str, int]:
    """The process's name (its script or role) and VmHWM in bytes."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().split(b"\0")
        with open(f"/proc/{pid}/status") as f:
            hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return "", 0
    text = b" ".join(cmd).decode(errors="replace")
    if "multiprocessing.spawn" in text:
        role = "worker"
    elif "resource_tracker" in text:
        role = "resource tracker"
    elif len(cmd) > 1 and cmd[1] != b"-c":
        role = os.path.basename(cmd[1].decode())
    else:
        role = "python"
    return role, hwm


def measure(argv: List[str]) -> Tuple[Dict[str, int], int, float]:
    """Run ``argv``; the peak RSS per process of its tree (polled), the exact tree maximum, the
    wall time."""
    env = {**os.environ, "ARRA_CPU_MODE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks: Dict[int, Tuple[str, int]] = {}
    done = threading.Event()

    def poll():
        while not done.is_set():
            stack = [proc.pid]
            while stack:
                pid = stack.pop()
                role, hwm = _status(pid)
                if hwm:
                    peaks[pid] = (role, max(hwm, peaks.get(pid, ("", 0))[1]))
                stack += _children(pid)
            time.sleep(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    poller.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    by_role: Dict[str, int] = {}
    for role, hwm in peaks.values():
        by_role[role] = max(by_role.get(role, 0), hwm)
    return by_role, usage.ru_maxrss * 1024, time.perf_counter() - start


def report(name: str, by_role: Dict[str, int], tree_max: int, seconds: float) -> None:
    roles = ", ".join(f"{role} {hwm / GIB:.2f} GiB" for role, hwm in sorted(by_role.items())
                      if hwm > GIB / 20)  # not the resource tracker or a git call
    print(f"{name:<28} {roles}; tree max {tree_max / GIB:.2f} GiB; {seconds:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny model instead of the 1.1B one (seconds)")
    parser.add_argument("--max-shard-size", nargs="+", default=["5GB", "500MB"],
                        help="export at each of these safetensors shard sizes")
    parser.add_argument("--tmp-dir", default=None, help="where the model and checkpoints go (default: system temp)")
    parser.add_argument("--build", nargs=2, metavar=("DIR", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        build_model(*args.build)
        return
    shape = "quick" if args.quick else "tinyllama-1.1b"
    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:
        hf = os.path.join(tmp, "hf")
        subprocess.run([sys.executable, os.path.abspath(__file__), "--build", hf, shape], check=True,
                       stderr=subprocess.DEVNULL)
        bare = [sys.executable, "-c", "import torch, transformers, safetensors, megatron.core, megatron.training, "
                "arra_megatron.conversion.common"]
        report("bare (libraries only)", *measure(bare))
        ckpt = os.path.join(tmp, "ckpt")
        report("import TP1", *measure([sys.executable, TOOL, "import", "--hf", hf, "--save", ckpt,
                                       "--dtype", "bfloat16"]))
        for size in args.max_shard_size:
            out = os.path.join(tmp, f"hf-{size}")
            by_role, tree_max, seconds = measure([sys.executable, TOOL, "export", "--load", ckpt, "--hf-out", out,
                                                  "--max-shard-size", size])
            shards = len([n for n in os.listdir(out) if n.endswith(".safetensors")])
            report(f"export {size} ({shards} shard{'s' * (shards > 1)})", by_role, tree_max, seconds)


if __name__ == "__main__":
    main()
