"""The base model's hashes in a LoRA's metadata (ss_sd_model_hash, ss_new_sd_model_hash), computed in a thread that
starts with the run (train.metadata.ModelFileHashes)."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest

from lorakit.train.metadata import ModelFileHashes


def test_hashes_are_sd_scripts_legacy_hash_and_the_files_sha256(tmp_path):
    model, vae = tmp_path / "model.safetensors", tmp_path / "vae.safetensors"
    data = bytes(range(256)) * 8192  # 2 MiB: the legacy hash reads 64 KiB at 1 MiB
    model.write_bytes(data)
    vae.write_bytes(data[::-1])
    keys = ModelFileHashes(SimpleNamespace(pretrained_model_name_or_path=str(model), vae=str(vae))).keys()
    assert keys == {
        "ss_sd_model_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8],
        "ss_new_sd_model_hash": hashlib.sha256(data).hexdigest(),
        "ss_vae_hash": hashlib.sha256(data[::-1][0x100000:0x110000]).hexdigest()[:8],
        "ss_new_vae_hash": hashlib.sha256(data[::-1]).hexdigest(),
    }
    # a diffusers folder or a hub name is no file: no keys, as sd-scripts
    assert ModelFileHashes(SimpleNamespace(pretrained_model_name_or_path=str(tmp_path), vae=None)).keys() == {}


def test_a_failure_in_the_thread_is_raised_where_the_keys_are_read(tmp_path, monkeypatch):
    from lorakit.models import saving

    model = tmp_path / "model.safetensors"
    model.write_bytes(b"x" * 100)

    def unreadable(path):
        raise PermissionError(f"{path}: permission denied")

    monkeypatch.setattr(saving, "file_hashes", unreadable)
    hashes = ModelFileHashes(SimpleNamespace(pretrained_model_name_or_path=str(model), vae=None))
    with pytest.raises(PermissionError, match="permission denied"):
        hashes.keys()
