"""Loader: sharded and single-file checkpoints, dtype handling, and errors that name the file and tensor."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import nemoh
from checkpoints import make_checkpoint
from nemoh.loader import CheckpointError


@pytest.fixture
def ckpt(tmp_path, tiny_checkpoint):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, dst)
    return dst


def test_sharded_and_single_file_give_same_model(ckpt, tmp_path):
    sharded = nemoh.load_model(ckpt, dtype="float32")
    single = tmp_path / "single"
    shutil.copytree(ckpt, single)
    tensors = load_file(str(single / "model.safetensors"))
    tensors.update(load_file(str(single / "model-mtp.safetensors")))
    (single / "model-mtp.safetensors").unlink()
    (single / "model.safetensors.index.json").unlink()
    save_file(tensors, str(single / "model.safetensors"))
    one = nemoh.load_model(single, dtype="float32")
    ids = torch.randint(0, 4096, (1, 9))
    assert torch.equal(sharded(ids), one(ids))


def test_dtype_conversion_keeps_router_in_float32(ckpt):
    model = nemoh.load_model(ckpt, dtype="bfloat16")
    assert model.lm_head.weight.dtype == torch.bfloat16
    gate = model.backbone.layers[2].mixer.gate
    assert gate.weight.dtype == torch.float32 and gate.e_score_correction_bias.dtype == torch.float32
    assert model(torch.tensor([[5, 6, 7]])).dtype == torch.float32


def test_auto_dtype_follows_checkpoint(tmp_path):
    path, _ = make_checkpoint(tmp_path / "bf16", dtype=torch.bfloat16, with_mtp=False)
    model = nemoh.load_model(path)           # dtype="auto"
    assert model.lm_head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("tie, stored_head", [(True, True), (True, False), (False, True)],
                         ids=["tied-config-stored-head", "tied-config-no-head", "untied"])
def test_lm_head_matches_transformers(tmp_path, tie, stored_head):
    """transformers' NemotronH never ties (`_tied_weights_keys = {}`): a stored lm_head.weight is the head even
    under tie_word_embeddings; only a checkpoint without one uses the embeddings (transformers would start that
    head from random numbers, so the oracle is given the embeddings as its head)."""
    path, hf = make_checkpoint(tmp_path / "ckpt", with_mtp=False, tie_word_embeddings=tie)
    assert not torch.equal(hf.lm_head.weight, hf.model.embeddings.weight)
    if not stored_head:
        _rewrite(path / "model.safetensors", lambda t: t.pop("lm_head.weight"))
        hf.lm_head.weight = hf.model.embeddings.weight
    model = nemoh.load_model(path, dtype="float32", strict=True)
    shared = model.lm_head.weight.data_ptr() == model.backbone.embeddings.weight.data_ptr()
    assert shared == (not stored_head)
    ids = torch.randint(0, 4096, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
        got = model(ids)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_loading_needs_no_numpy(tiny_checkpoint):
    """numpy is not a dependency (it arrives with the test extras only): load and generate with it unavailable."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["numpy"] = None     # as in a venv without numpy: torch's .numpy() raises
        from nemoh import LLM, SamplingParams
        llm = LLM({str(tiny_checkpoint)!r}, cache_memory_gb=0.05)
        out = llm.generate(["Hello"], SamplingParams(max_tokens=3, temperature=0.0))
        print(len(out[0].outputs[0].token_ids))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "3"


def test_missing_tensor_names_it(ckpt):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    del index["weight_map"]["backbone.layers.0.mixer.A_log"]
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json.*backbone\.layers\.0\.mixer\.A_log"):
        nemoh.load_model(ckpt)


def _rewrite(path, fn):
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def test_shape_mismatch_names_file_and_tensor(ckpt):
    _rewrite(ckpt / "model.safetensors",
             lambda t: t.__setitem__("backbone.layers.1.mixer.q_proj.weight", torch.zeros(3, 3)))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*backbone\.layers\.1\.mixer\.q_proj\.weight.*shape"):
        nemoh.load_model(ckpt)


def test_dtype_mismatch_names_file_and_tensor(ckpt):
    def corrupt(t):
        t["backbone.norm_f.weight"] = torch.zeros(t["backbone.norm_f.weight"].shape, dtype=torch.int32)
    _rewrite(ckpt / "model.safetensors", corrupt)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*backbone\.norm_f\.weight.*dtype"):
        nemoh.load_model(ckpt)


def test_truncated_shard_names_file(ckpt):
    shard = ckpt / "model-mtp.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model-mtp\.safetensors.*truncated"):
        nemoh.load_model(ckpt)


def test_corrupt_header_names_file(ckpt):
    shard = ckpt / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:20] = b"not json!!!!"
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*corrupt"):
        nemoh.load_model(ckpt)


def test_missing_shard_file(ckpt):
    (ckpt / "model-mtp.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-mtp\.safetensors.*missing"):
        nemoh.load_model(ckpt)


def test_missing_config_json(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        nemoh.load_model(ckpt)


def test_unexpected_tensor_warns_or_fails_in_strict_mode(ckpt, caplog):
    _rewrite(ckpt / "model-mtp.safetensors", lambda t: t.__setitem__("backbone.extra.weight", torch.zeros(2)))
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["backbone.extra.weight"] = "model-mtp.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    nemoh.load_model(ckpt)
    assert "backbone.extra.weight" in caplog.text
    with pytest.raises(CheckpointError, match=r"backbone\.extra\.weight.*model-mtp\.safetensors"):
        nemoh.load_model(ckpt, strict=True)


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "weights.bin"])
def test_index_cannot_point_outside_or_to_pickle(ckpt, target):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = target
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        nemoh.load_model(ckpt)


def test_pickle_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "nemotron_h", "vocab_size": 8,
                                                      "hidden_size": 8, "num_attention_heads": 2,
                                                      "hybrid_override_pattern": "-"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pickle"):
        nemoh.load_model(tmp_path)


def test_peak_memory_while_loading_is_bounded(tmp_path):
    """Peak RSS growth while loading stays within 1.3x the loaded model's bytes (measured in a subprocess,
    with the kernel's peak-RSS counter reset just before loading)."""
    path, _ = make_checkpoint(tmp_path / "big", with_mtp=False, vocab_size=32768, hidden_size=512,
                              num_attention_heads=8, head_dim=64, intermediate_size=2048, tokenizer=False)
    script = textwrap.dedent(f"""
        import torch, nemoh, nemoh.loader
        def status(key):
            for line in open('/proc/self/status'):
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        # the first nn.Embedding built on the meta device loads torch's random-init kernels (~70 MiB, once, whatever
        # the model's size); pay that before measuring so the figure is the loading itself
        torch.nn.Embedding(2, 2, device="meta")
        open('/proc/self/clear_refs', 'w').write('5')
        base = status('VmRSS:')
        model = nemoh.load_model({str(path)!r}, dtype='float32')
        peak = status('VmHWM:') - base
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        size += sum(b.numel() * b.element_size() for b in model.buffers())
        print(peak, size)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    peak, size = map(int, out.stdout.split()[-2:])
    print(f"model {size / 2**20:.1f} MiB, peak RSS growth while loading {peak / 2**20:.1f} MiB "
          f"({peak / size:.2f}x)")
    assert peak <= 1.3 * size


def test_fp8_kv_cache_scales_are_read_from_the_checkpoint(ckpt):
    """k_proj.k_scale / v_proj.v_scale (ModelOpt's FP8 KV-cache scales) land in model.kv_scales by layer."""
    def add(t):
        t["backbone.layers.1.mixer.k_proj.k_scale"] = torch.tensor(0.5)
        t["backbone.layers.1.mixer.v_proj.v_scale"] = torch.tensor([0.25])
    _rewrite(ckpt / "model.safetensors", add)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    for name in ("backbone.layers.1.mixer.k_proj.k_scale", "backbone.layers.1.mixer.v_proj.v_scale"):
        index["weight_map"][name] = "model.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    model = nemoh.load_model(ckpt, strict=True)
    assert model.kv_scales == {1: (0.5, 0.25)}
