"""Export's shard plan: whole units packed in order up to the size limit, a larger unit alone,
the index as transformers writes it."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from arra_megatron.conversion.hf_export import Unit, parse_size, write_shards


def test_units_pack_in_order_and_a_large_unit_gets_its_own_shard(tmp_path):
    tensors = {f"t{i}": torch.full((n,), float(i), dtype=torch.bfloat16) for i, n in
               enumerate((20, 20, 75, 15, 15, 15))}  # bytes: 40, 40, 150, 30, 30, 30
    units = [Unit(t.nbytes, lambda name=name, t=t: iter([(name, t)])) for name, t in tensors.items()]
    assert write_shards(str(tmp_path), units, parse_size("100B")) == 3
    with open(tmp_path / "model.safetensors.index.json") as f:
        index = json.load(f)
    files = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["weight_map"] == {"t0": files[0], "t1": files[0], "t2": files[1], "t3": files[2], "t4": files[2],
                                   "t5": files[2]}
    assert index["metadata"] == {"total_size": 320, "total_parameters": 160}
    for file in files:
        for name, tensor in load_file(tmp_path / file).items():
            assert torch.equal(tensor, tensors[name]), name


def test_one_shard_is_model_safetensors(tmp_path):
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert write_shards(str(tmp_path), [Unit(t.nbytes, lambda: iter([("w", t)]))], parse_size("5GB")) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert torch.equal(load_file(tmp_path / "model.safetensors")["w"], t)


def test_streamed_file_is_the_librarys(tmp_path):
    """The streaming writer against safetensors' own: byte-identical when the tensors come in
    the order ``save_file`` lays them out (by alignment, then name), and read back equal."""
    from safetensors.torch import save_file

    from arra_megatron.conversion.safetensors_stream import write_safetensors

    tensors = {"b": torch.randn(3, 5), "c": torch.arange(7, dtype=torch.int64),
               "a": torch.randn(2, 3).to(torch.bfloat16), "d": torch.tensor([True, False, True])}
    save_file(tensors, tmp_path / "library.safetensors", metadata={"format": "pt"})
    header = write_safetensors(str(tmp_path / "streamed.safetensors"), iter([(n, tensors[n]) for n in "cbad"]))
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "library.safetensors").read_bytes()
    assert [header[n]["shape"] for n in "cbad"] == [[7], [3, 5], [2, 3], [3]]
    write_safetensors(str(tmp_path / "any_order.safetensors"), iter(tensors.items()))
    loaded = load_file(tmp_path / "any_order.safetensors")
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[n], t) for n, t in tensors.items())
