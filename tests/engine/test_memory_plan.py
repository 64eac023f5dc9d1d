"""The memory plan (nemoh.engine.memory_plan): weights counted from the config alone as the loaded model holds
them, Super's published parameter count, cache sizing that refuses what does not fit, and no step of an
engine (MTP k=3, 32 sequences, a tight cache) allocating more than the plan's transients."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nemoh.config import NemotronHConfig
from nemoh.engine.memory_plan import count_weights, loaded_tensors, make_plan, model_tensors
from nemoh.engine.memory_profile import TensorMemoryTracker
from nemoh.quant.modelopt import QuantConfig

REPO = Path(__file__).resolve().parents[2]
SUPER = REPO / "benchmarks" / "configs"
GiB = 1024 ** 3


@pytest.fixture(scope="module")
def super_nvfp4():
    cfg = NemotronHConfig.from_pretrained(SUPER / "super-nvfp4")
    return cfg, QuantConfig.from_model_dir(SUPER / "super-nvfp4")


def test_super_parameter_count_and_per_token_figures(super_nvfp4):
    cfg, qcfg = super_nvfp4
    plan = make_plan(cfg, device_bytes=int(131.3 * GiB), quant_config=qcfg, kv_cache_dtype=torch.float8_e4m3fn,
                     max_model_len=1 << 20, max_num_seqs=32, num_speculative_tokens=3)
    w = plan.weights
    assert round(w.total_params / 1e9, 1) == 123.6                     # the published 123.6B
    # routed experts: 40 layers x 512 experts x (up + down) of 2688 x 1024, NVFP4: 4 bits + one fp8 scale per 16
    routed = 40 * 512 * 2 * 2688 * 1024
    assert w.params["routed experts"] == routed
    assert w.bytes["routed experts"] == routed // 2 + routed // 16 + 40 * 512 * 2 * 4
    assert w.formats["routed experts"] == {"nvfp4"}
    # 9 attention layers (8 + MTP) x K and V x 2 heads x 128, one byte each in fp8
    assert plan.kv_bytes_per_token == 9 * 2 * 2 * 128
    # 40 Mamba layers x (conv (8192 + 2 * 8 * 128) x 3 bf16 + ssm 128 x 64 x 128 fp32)
    assert plan.mamba_bytes_per_seq == 40 * ((8192 + 2048) * 3 * 2 + 128 * 64 * 128 * 4)
    # the 20 GiB the issue counted: (1 + k) states per sequence in every Mamba layer, in buffers allocated once
    verify = next(v for name, v in plan.resident.items() if name.startswith("MTP verify states"))
    assert verify == 32 * 4 * plan.mamba_bytes_per_seq
    assert plan.transient["expert stacking (first use)"] == 512 * 2688 * 1024 * 2     # MTP's bf16 experts
    assert plan.fit(1 << 20) >= 1 and plan.fit(8192) == 32
    tp2 = make_plan(cfg, device_bytes=int(74.5 * GiB), quant_config=qcfg, kv_cache_dtype=torch.float8_e4m3fn,
                    max_model_len=1 << 20, max_num_seqs=32, num_speculative_tokens=3, tp=2, model=None)
    assert tp2.kv_bytes_per_token == plan.kv_bytes_per_token // 2
    assert tp2.resident["weights"] < 0.51 * plan.resident["weights"] + GiB


@pytest.mark.parametrize("model_dir", ["model", "model-nvfp4"])
def test_meta_count_equals_the_loaded_model(model_dir):
    """What the plan counts from config.json (one template layer per type, quantized modules swapped in by
    name) is what the loader builds, tensor for tensor."""
    from nemoh.loader import load_model

    path = REPO / "nemoh" / "demo" / model_dir
    cfg = NemotronHConfig.from_pretrained(path)
    model = load_model(str(path), dtype="bfloat16")
    loaded = count_weights(loaded_tensors(model), cfg, torch.bfloat16)
    planned = count_weights(model_tensors(cfg, QuantConfig.from_model_dir(path)), cfg, torch.bfloat16)
    assert planned.bytes == loaded.bytes
    assert planned.params == loaded.params
    assert planned.largest_expert_stack == loaded.largest_expert_stack > 0


def test_plan_refuses_what_does_not_fit_and_says_what_does():
    cfg = NemotronHConfig.from_pretrained(REPO / "nemoh" / "demo" / "model")
    plan = make_plan(cfg, device_bytes=int(0.3 * GiB), max_model_len=10_000_000, num_speculative_tokens=3,
                     utilization=1.0)
    with pytest.raises(ValueError, match=r"--max-model-len 10000000 does not fit.*at most --max-model-len (\d+)"):
        plan.check_fits()
    longest = plan.max_len_for_one()
    ok = make_plan(cfg, device_bytes=int(0.3 * GiB), max_model_len=longest, num_speculative_tokens=3, utilization=1.0)
    ok.check_fits()
    assert ok.fit(longest) == 1
    over = make_plan(cfg, device_bytes=int(0.3 * GiB), max_model_len=longest + 64, num_speculative_tokens=3,
                     utilization=1.0)
    with pytest.raises(ValueError):
        over.check_fits()
    blocks, slots = ok.cache_sizes()
    assert blocks * ok.block_size * ok.kv_bytes_per_token + slots * ok.mamba_bytes_per_seq <= ok.cache_bytes


def test_engine_refuses_a_context_it_cannot_hold(ckpt):
    from nemoh import LLM

    with pytest.raises(ValueError, match="at most --max-model-len"):
        LLM(ckpt[0], dtype="float32", max_model_len=4_000_000, cache_memory_gb=0.01)


def test_mtp_32_sequences_never_exceed_the_plan(ckpt):
    """MTP k=3, 32 sequences, a cache too small for all of them at once: every request finishes (the excess
    waits; nothing fails for memory), and no step allocates more than the plan's transients (every third step
    measured tensor by tensor: the tracker makes a step ~10x slower)."""
    from nemoh import LLM
    from nemoh.sampling_params import SamplingParams

    llm = LLM(ckpt[0], dtype="float32", max_model_len=512, max_num_seqs=32, max_num_batched_tokens=256,
              cache_memory_gb=0.0009, num_state_slots=32,
              speculative_config={"method": "mtp", "num_speculative_tokens": 3},
              enforce_eager=True)
    engine = llm.engine
    runner = engine.runner
    plan = runner.plan
    assert runner.num_state_slots == 32
    # the per-position states of a verification live in buffers allocated once, for 32 x (1 + 3) positions,
    # exactly as many bytes as the plan counts; every roll-back reads them from there
    held = {t.untyped_storage().data_ptr(): t for pair in runner.verify_states.values() for t in pair}
    counted = next(v for name, v in plan.resident.items() if name.startswith("MTP verify states"))
    assert counted == sum(t.untyped_storage().nbytes() for t in held.values()) == 32 * 4 * plan.mamba_bytes_per_seq
    rollbacks = []

    def rollback(seq, intermediate, position, original=runner.rollback_mamba_state):
        rollbacks.append(all(t.untyped_storage().data_ptr() in held for pair in intermediate.values() for t in pair))
        original(seq, intermediate, position)

    runner.rollback_mamba_state = rollback
    prompts = [[(7 * i + j) % 4000 + 20 for j in range(24 + i)] for i in range(36)]
    assert engine.runner.num_kv_blocks * engine.args.block_size < sum(len(p) + 12 for p in prompts)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    peak, done, step, most_running = 0, set(), 0, 0
    while engine.has_unfinished_requests():
        most_running = max(most_running, engine.scheduler.num_running)
        if step % 3 == 0:
            with TensorMemoryTracker() as tracker:
                outs = engine.step()
            peak = max(peak, tracker.peak_bytes)
        else:
            outs = engine.step()
        step += 1
        assert not any(o.error for o in outs)
        done.update(o.request_id for o in outs if o.finished)
    assert done == {str(i) for i in range(36)}
    assert engine.spec_stats.num_drafted > 0 and most_running >= 8
    assert 0 < peak <= plan.transient_bytes, (peak, plan.transient)
    assert rollbacks and all(rollbacks)


def test_startup_profile_measures_the_largest_step(ckpt):
    """profile_memory: a dummy prefill chunk and a verification of max_num_seqs x (1 + k) rows run at start-up;
    their measured peak replaces the estimate the caches are sized around, and the banner and stats() show both."""
    from nemoh import LLM

    llm = LLM(ckpt[0], dtype="float32", max_model_len=512, max_num_seqs=32, max_num_batched_tokens=256,
              speculative_config={"method": "mtp", "num_speculative_tokens": 3}, profile_memory=True,
              enforce_eager=True)
    runner = llm.engine.runner
    profile, plan = runner.profile, runner.plan
    assert profile.shapes == ["2 prefill chunks of 256 tokens + MTP drafts", "verification of 32 x 4 rows"]
    assert plan.measured_transient == profile.peak_bytes == plan.transient_bytes >= 0
    assert plan.estimated_transient_bytes == sum(plan.transient.values()) > 0
    assert any("measured by the start-up profiling step" in line for line in plan.summary_lines())
    stats = llm.engine.stats()
    assert stats["memory_plan_transient_measured_bytes"] == profile.peak_bytes
    assert stats["memory_plan_transient_estimated_bytes"] == plan.estimated_transient_bytes
    # the dummy steps leave nothing behind: the engine still generates, and its caches start empty
    from nemoh.sampling_params import SamplingParams

    out = llm.generate([{"prompt_token_ids": list(range(20, 60))}], SamplingParams(temperature=0, max_tokens=8))
    assert len(out[0].outputs[0].token_ids) == 8
    # without cache_memory_gb / num_kv_blocks the engine profiles by default; with them it does not
    assert runner.args.profile_memory is True
    plain = LLM(ckpt[0], dtype="float32", max_model_len=256, cache_memory_gb=0.01, enforce_eager=True)
    assert plain.engine.runner.profile is None and plain.engine.runner.plan.measured_transient is None


def test_profile_sees_resident_memory_the_tensors_do_not_show():
    """On a CPU the profiling step reads the resident-set high-water mark after resetting it."""
    from nemoh.engine import memory_profile as mp

    if mp._status_bytes("VmHWM") is None or not mp._reset_rss_peak():
        pytest.skip("no /proc/self/clear_refs")
    base = mp._status_bytes("VmRSS")
    block = torch.ones(64 * 2 ** 20, dtype=torch.uint8)
    del block
    assert mp._status_bytes("VmHWM") - base >= 60 * 2 ** 20
