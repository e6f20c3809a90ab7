#!/usr/bin/env python
"""Convert between Hugging Face transformers directories and Megatron-LM checkpoints.

Examples:
    # A Llama-family model from Hugging Face into a TP2 x PP2 checkpoint to fine-tune with ARRA
    # (4 local CPU processes, one per rank): CKPT/release and its tracker file, the model
    # described by the Megatron-LM arguments saved in it; the flags to train it with are printed
    # and kept in CKPT/arra_conversion.json ("trainer_flags")
    python tools/convert_checkpoint.py import --hf /models/Llama-3.2-1B --save ckpt/llama \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --dtype bfloat16
    FLAGS=$(python -c "import json; print(' '.join(json.load(open('ckpt/llama/arra_conversion.json'))['trainer_flags']))")
    torchrun --nproc-per-node 4 examples/pretrain_arra.py $FLAGS --pretrained-checkpoint ckpt/llama \\
        --load runs/arra --save runs/arra --save-interval 1000 ...

    # A checkpoint of arra_megatron's own trainer (before it trained through Megatron-LM's loop)
    python tools/convert_checkpoint.py legacy --load runs/old/ckpt --save runs/old/megatron

    # Any Megatron-LM checkpoint (any TP / PP / DP) back to a transformers directory (the ARRA
    # projector is left out; tokenizer files and generation config from --tokenizer)
    python tools/convert_checkpoint.py export --load runs/arra/ckpt --hf-out hf/arra-llama \\
        --tokenizer /models/Llama-3.2-1B

    # Chameleon-7B (architecture detected): also writes CKPT/vq_model (its VQ-VAE, for
    # build_indexed_dataset.py --image-tokenizer) and CKPT/tokenizer_profile.json (its own image-token
    # ids, for --tokenizer-profile); export finds them again through the run's --load, or --import-dir
    python tools/convert_checkpoint.py import --hf /models/chameleon-7b --save ckpt/chameleon-7b \
        --tensor-model-parallel-size 4 --dtype bfloat16
    python tools/convert_checkpoint.py export --load runs/arra-chameleon --hf-out hf/arra-chameleon \
        --model-type chameleon --import-dir ckpt/chameleon-7b

Exit status: 0 converted, 2 bad flags or inputs (nothing is written then).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import List, Optional

logger = logging.getLogger("convert_checkpoint")


def build_parser() -> argparse.ArgumentParser:
    from arra_megatron.conversion import FAMILIES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face directory -> Megatron-LM checkpoint")
    imp.add_argument("--hf", required=True, help="transformers checkpoint directory (config.json + safetensors)")
    imp.add_argument("--save", required=True, help="new checkpoint directory (must not exist)")
    imp.add_argument("--tensor-model-parallel-size", type=int, default=1)
    imp.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    imp.add_argument("--make-vocab-size-divisible-by", type=int,
                     help="as Megatron-LM's flag: the vocabulary is padded to a multiple of this x TP "
                          "(default: a value that leaves the vocabulary unpadded, at TP up to 8 when possible)")
    imp.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                     help="parameter dtype of the checkpoint (--bf16 / --fp16 in its saved arguments)")
    exp = sub.add_parser("export", help="Megatron-LM checkpoint -> Hugging Face directory")
    exp.add_argument("--load", required=True,
                     help="checkpoint root (with latest_checkpointed_iteration.txt) or an iter_* / release directory")
    exp.add_argument("--hf-out", required=True, help="new output directory (must not exist)")
    exp.add_argument("--model-type", choices=sorted(FAMILIES),
                     help="the family to write (default: the one the checkpoint records; a different one fails)")
    exp.add_argument("--vocab-size", type=int,
                     help="the unpadded vocabulary (default: the checkpoint's saved --vocab-size, or its datasets' "
                          "manifests)")
    exp.add_argument("--tokenizer", help="directory whose tokenizer files and generation_config.json go with the "
                     "export, e.g. the Hugging Face model you imported (default: the copy an import kept in "
                     "CKPT/hf_tokenizer, when there)")
    exp.add_argument("--import-dir", help="the checkpoint directory tools/convert_checkpoint.py import wrote for "
                     "the model this run started from: a Chameleon export takes its vocabulary map, VQ-VAE "
                     "config and weights and tokenizer from there (default: --load itself when it is an import, "
                     "else the --load or --pretrained-checkpoint the run was started with; give it for a resumed "
                     "run)")
    exp.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB or 500MB")
    sub.add_parser("legacy", add_help=False,
                   help="a checkpoint of arra_megatron's own trainer (before training moved onto Megatron-LM's "
                        "loop) -> Megatron-LM checkpoint; 'legacy --help' for its flags")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["legacy"]:
        from arra_megatron.conversion.legacy import main as convert_legacy

        return convert_legacy(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from arra_megatron.conversion.common import ConversionError
    from arra_megatron.conversion.hf_export import export_checkpoint
    from arra_megatron.conversion.hf_import import import_checkpoint

    try:
        if args.command == "import":
            if args.tensor_model_parallel_size < 1 or args.pipeline_model_parallel_size < 1:
                raise ConversionError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
            record = import_checkpoint(args.hf, args.save, args.tensor_model_parallel_size,
                                       args.pipeline_model_parallel_size, dtype=args.dtype,
                                       make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
            # Megatron-LM's rule: --load RUN resumes the run once it has saved, else starts from the import.
            print("trainer flags: " + " ".join(record["trainer_flags"]) +
                  f" --pretrained-checkpoint {args.save} --load RUN_DIR --save RUN_DIR --save-interval N")
            if record.get("tokenizer_profile"):  # a model whose vocabulary holds its image tokens (Chameleon)
                import os

                print("build datasets with: tools/build_indexed_dataset.py --image-tokenizer "
                      f"{os.path.join(args.save, record['vq_model'])} --tokenizer-profile "
                      f"{os.path.join(args.save, record['tokenizer_profile'])} ...")
        else:
            summary = export_checkpoint(args.load, args.hf_out, args.model_type, vocab_size=args.vocab_size,
                                        max_shard_size=args.max_shard_size, tokenizer=args.tokenizer,
                                        import_dir=args.import_dir)
            if summary["left_out"]:
                print(f"left out the ARRA projector ({len(summary['left_out'])} tensors)")
            print(json.dumps({k: summary[k] for k in ("checkpoint", "hf_out")}))
    except ConversionError as error:
        logger.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
