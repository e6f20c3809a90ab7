"""inference/output.py: per-replica shards, the resume reading, the merge."""

from __future__ import annotations

import json

import pytest
import torch

from arra_megatron.inference.output import INDEX_FILE, IncompleteSamples, SampleWriter, merge, recorded


def _decode(codes: torch.Tensor) -> torch.Tensor:  # codes -> a flat grey image per row, in [-1, 1]
    return (codes.float().mean(dim=1) / 8 - 1).view(-1, 1, 1, 1).expand(-1, 3, 4, 4)


def test_shards_merge_in_request_order_and_a_cut_line_is_dropped(tmp_path):
    second = SampleWriter(str(tmp_path), _decode, replica=1, replicas=2)
    second.add(torch.tensor([[3, 3], [4, 4]]), [{"seed": 3}, {"seed": 4}], [2, 3])
    second.close()
    first = SampleWriter(str(tmp_path), _decode, replica=0, replicas=2)
    first.add(torch.tensor([[1, 1], [2, 2]]), [{"seed": 1}, {"seed": 2}], [0, 1])
    first.close()
    shard = tmp_path / "samples.part-00000-of-00002.jsonl"
    shard.write_text(shard.read_text() + '{"file": "000004.png", "se')  # killed mid-line
    assert sorted(recorded(str(tmp_path))) == [0, 1, 2, 3]
    with pytest.raises(IncompleteSamples, match="1 of 5 images missing"):
        merge(str(tmp_path), 5)
    again = SampleWriter(str(tmp_path), _decode, replica=0, replicas=2)  # the resumed replica
    again.add(torch.tensor([[5, 5]]), [{"seed": 5}], [4])
    again.close()
    merge(str(tmp_path), 5, grid_nrow=5)
    rows = [json.loads(line) for line in (tmp_path / INDEX_FILE).read_text().splitlines()]
    assert [(r["file"], r["seed"], r["codes"]) for r in rows] == [
        (f"{i:06d}.png", i + 1, [i + 1, i + 1]) for i in range(5)]
    assert (tmp_path / "grid.png").is_file() and not list(tmp_path.glob("samples.part-*"))
