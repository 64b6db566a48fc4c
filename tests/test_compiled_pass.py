"""engine/training/compiled_pass.py: the exported graphs kept on disk stay within their bounds."""
from __future__ import annotations

import os

from engine.training import compiled_pass
from engine.training.compiled_pass import _prune


def _graphs(folder, sizes):
    for age, size in enumerate(sizes):  # the first written is the oldest
        path = folder / f"g{age}.onnx"
        path.write_bytes(b"x" * size)
        os.utime(path, (1_000_000 + age, 1_000_000 + age))


def test_the_newest_graphs_are_kept_within_the_count_and_the_bytes(tmp_path, monkeypatch):
    _graphs(tmp_path, [10] * 9)
    (tmp_path / "notes.txt").write_text("not a graph")
    _prune(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == [f"g{i}.onnx" for i in range(3, 9)]
    assert (tmp_path / "notes.txt").exists()
    monkeypatch.setattr(compiled_pass, "KEEP_BYTES", 25)
    _prune(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == ["g7.onnx", "g8.onnx"]
    monkeypatch.setattr(compiled_pass, "KEEP_BYTES", 1)  # the newest stays, however large
    _prune(tmp_path)
    assert [p.name for p in tmp_path.glob("*.onnx")] == ["g8.onnx"]
