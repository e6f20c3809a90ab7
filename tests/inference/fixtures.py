"""A tiny text-to-image dataset built by the real builder, a model trained on it by the training
loop (examples/pretrain_arra.py, Megatron-LM's loop), and its Hugging Face export: what the
generation tests sample from."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from arra_megatron.runtime.launch import free_port
from arra_megatron.tiny import make_janus_vq
from tests.support.tiny_data import make_hf_tokenizer, make_image, random_caption

ROOT = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 16  # JanusVQ with 4x downsampling: 4 x 4 = 16 image tokens
MAX_SEQ_LENGTH = 32  # up to 12 caption tokens
# Llama-style (exportable to LlamaForCausalLM), 2 layers, GQA.
MODEL_FLAGS = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --group-query-attention --num-query-groups 2 "
    "--seq-length 31 --max-position-embeddings 31 --micro-batch-size 4 --global-batch-size 8 --lr 3e-3 "
    "--train-iters 4 --log-interval 1 --hidden-dropout 0 --attention-dropout 0 --position-embedding-type rope "
    "--normalization RMSNorm --swiglu --disable-bias-linear --untie-embeddings-and-output-weights --no-arra "
    "--arra-condition-dropout-prob 0.2 --num-workers 0 --split 100,0,0 --eval-iters 0 --save-interval 4"
).split()


@dataclass
class TrainedModel:
    root: Path
    prefix: Path  # the dataset
    checkpoint: Path  # the loop's --save directory
    vq: Path
    tokenizer: Path


def build_t2i_dataset(root: Path, num_images: int = 16) -> tuple[Path, Path, Path]:
    """(dataset prefix, VQ dir, tokenizer dir): captions of different lengths, 32 px images."""
    from arra_megatron.data.builder import BuildConfig, build_dataset

    vq = make_janus_vq(root / "vq")
    tokenizer = make_hf_tokenizer(root / "tokenizer")
    rng = random.Random(0)
    images = root / "images"
    images.mkdir()
    with open(root / "table.jsonl", "w") as f:
        for i in range(num_images):
            make_image(i, (IMAGE_SIZE, IMAGE_SIZE)).save(images / f"{i}.png")
            f.write(json.dumps({"image": f"images/{i}.png", "caption": random_caption(rng, rng.randint(2, 9))}) + "\n")
    prefix = root / "data" / "t2i"
    build_dataset(BuildConfig(input=str(root / "table.jsonl"), output_prefix=str(prefix), image_tokenizer=str(vq),
                              image_size=IMAGE_SIZE, max_seq_length=MAX_SEQ_LENGTH, text_tokenizer=str(tokenizer),
                              workers=1, device="cpu"))
    return prefix, vq, tokenizer


def train(prefix: Path, save: Path, *flags: str, nproc: int = 1) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(ROOT / "examples" / "pretrain_arra.py"), *MODEL_FLAGS,
           "--data-path", str(prefix), "--save", str(save), *flags]
    env = {**os.environ, "ARRA_CPU_MODE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def trained_model(root: Path) -> TrainedModel:
    prefix, vq, tokenizer = build_t2i_dataset(root)
    train(prefix, root / "ckpt")
    return TrainedModel(root, prefix, root / "ckpt", vq, tokenizer)
