"""The demo trainer: masks, batching, router balancing, a 20-step run on a tiny config and its checkpoint."""
import json
import math

import pytest
import torch

from nemoh.config import NemotronHConfig
from nemoh.demo import corpus, train
from nemoh.models import NemotronHForCausalLM

TINY = dict(
    architectures=["NemotronHForCausalLM"], model_type="nemotron_h", vocab_size=4096, hidden_size=64,
    hybrid_override_pattern="M*E-", num_attention_heads=2, num_key_value_heads=1, head_dim=32,
    intermediate_size=128, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, n_groups=2, conv_kernel=4,
    chunk_size=64, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, moe_latent_size=32,
    moe_shared_expert_intermediate_size=64, n_group=2, topk_group=1, norm_topk_prob=True,
    routed_scaling_factor=2.5, num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E",
    eos_token_id=[2, 11], pad_token_id=3, bos_token_id=1, initializer_range=0.02,
)


@pytest.fixture(scope="module")
def encoder():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(corpus.MODEL_DIR / "tokenizer.json")), corpus.load_template()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 20-step training run on the tiny config; returns its output directory."""
    root = tmp_path_factory.mktemp("train")
    config = root / "tiny.json"
    config.write_text(json.dumps(TINY))
    out = root / "ckpt"
    rc = train.main(["--out", str(out), "--config", str(config), "--steps", "20", "--examples", "64",
                     "--batch-tokens", "2560", "--lr", "4e-3", "--warmup", "4", "--log-every", "1",
                     "--workers", "0", "--seed", "1", "--ema", "0.9"])
    assert rc == 0
    return out


def test_mask_covers_exactly_the_assistant_targets(encoder):
    tokenizer, template = encoder
    for ex in corpus.generate("train", 30, 3):
        ids, mask = train.encode_example(ex, tokenizer, template)
        assert len(ids) == len(mask) and mask[-1]
        targets = [text for text, is_target in corpus.training_segments(ex, template) if is_target]
        masked = tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
        assert masked == "".join(targets)
        # every target run starts after an assistant generation prompt and ends with <|im_end|>
        runs, start = [], None
        for i, m in enumerate(mask + [False]):
            if m and start is None:
                start = i
            elif not m and start is not None:
                runs.append((start, i))
                start = None
        for s, e in runs:
            assert ids[e - 1] == 11  # <|im_end|>
            before = tokenizer.decode(ids[:s], skip_special_tokens=False)
            assert before.endswith(("<|im_start|>assistant\n<think>\n", "<|im_start|>assistant\n<think></think>"))
        assert "<|im_start|>user" not in masked and "<|im_start|>system" not in masked


def test_batches_are_right_padded_to_a_common_length():
    stream = train.BatchStream(24, seed=0, batch_tokens=4096, window=24, workers=0)
    seen = 0
    for (ids, mask), _ in zip(stream, range(4)):
        assert ids.shape == mask.shape and ids.shape[1] % 64 == 0
        assert ids.numel() <= 4096 or ids.shape[0] == 1
        for row, m in zip(ids, mask):
            real = int((row != train.PAD_ID).nonzero().max()) + 1
            assert (row[real:] == train.PAD_ID).all() and not m[real:].any()
        seen += ids.shape[0]
    assert seen > 0
    stream.close()


def test_copy_batches_repeat_a_value_and_target_only_the_repeat(encoder):
    tokenizer, _ = encoder
    batches = iter(train.CopyBatches(seed=0, rows=16, length=64))   # the trainer's length: a long e-mail row
    for _ in range(3):                                                   # (30 tokens) fits twice
        ids, mask = next(batches)
        assert ids.shape == mask.shape == (16, 64)
        for row, m in zip(ids.tolist(), mask.tolist()):
            start = m.index(True)
            value = row[start:start + sum(m)]
            assert all(m[start:start + len(value)])              # one contiguous run of targets
            key_end = start - 1                                   # the value follows "=" and its key
            eq = max(i for i in range(key_end + 1) if row[i] == tokenizer.token_to_id("="))
            key = row[eq + 1:start]
            first = next(i for i in range(eq) if row[i:i + len(key) + len(value)] == key + value)
            assert first + len(key) + len(value) <= eq              # the value appeared earlier, un-targeted
            assert not any(m[:eq])


def test_copy_batches_come_every_nth_step():
    stream = iter([(f"t{i}", None) for i in range(6)])
    kinds = [is_copy for _, _, is_copy in train.with_copy_batches(stream, iter([("c", None)] * 9), 3)]
    assert kinds == [False, False, True, False, False, True, False, False, True]
    assert not any(c for _, _, c in train.with_copy_batches(iter([("t", None)] * 4), (), 0))


def test_copy_schedule_relaxes_once_the_copy_is_learned():
    schedule = train.CopySchedule(every=3, learned_every=6, threshold=0.05, window=2)
    stream = iter([(f"t{i}", None) for i in range(12)])
    kinds = []
    for _, _, is_copy in train.with_copy_batches(stream, iter([("c", None)] * 20), schedule):
        kinds.append(is_copy)
        if is_copy:
            schedule.record(1.0 if sum(kinds) == 1 else 0.01, step=len(kinds))
    # a copy after every 2 ticket batches until the mean of the last two copy losses is below the threshold
    # (the third copy), then after every 5
    assert kinds == [False, False, True, False, False, True, False, False, True,
                     False, False, False, False, False, True, False]
    assert schedule.learned_at_step == 9


def test_router_bias_moves_towards_balance():
    config = NemotronHConfig.from_dict(TINY)
    model = NemotronHForCausalLM(config)
    train.init_weights(model, TINY)
    balancer = train.RouterBalancer(model, rate=0.01)
    router = balancer.routers[0]
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0] = 1.0  # experts 0 and 1 (top-2) win every token with positive input
        router.weight[1] = 0.5
    router(torch.ones(32, config.hidden_size))
    assert balancer.update() == 4.0  # two of eight experts take all the load
    bias = router.e_score_correction_bias
    assert (bias[:2] == -0.01).all() and (bias[2:] == 0.01).all()
    balancer.remove()


def test_init_matches_the_reference_recipe():
    config = NemotronHConfig.from_dict(TINY)
    model = NemotronHForCausalLM(config)
    train.init_weights(model, TINY)
    mixer = model.backbone.layers[0].mixer
    assert torch.allclose(mixer.A_log, torch.log(torch.arange(1, config.mamba_num_heads + 1).float()))
    assert (mixer.D == 1).all()
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert (dt >= config.time_step_floor - 1e-7).all() and (dt <= config.time_step_max + 1e-6).all()
    assert abs(float(model.lm_head.weight.detach().std()) - 0.02) < 0.002


def test_loss_and_mtp_loss_decrease(run):
    log = [json.loads(line) for line in (run / train.LOG_FILE).read_text().splitlines()]
    assert len(log) == 20
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["mtp_loss"]) and r["mtp_loss"] > 0 for r in log)
    first = sum(r["lm_loss"] for r in log[:3]) / 3
    last = sum(r["lm_loss"] for r in log[-3:]) / 3
    assert last < first - 0.3
    assert sum(r["mtp_loss"] for r in log[-3:]) < sum(r["mtp_loss"] for r in log[:3]) - 0.3


def test_checkpoint_loads_with_matching_logits(run):
    from safetensors import safe_open

    from nemoh.loader import load_model

    for name in ("config.json", "model.safetensors", "generation_config.json", *train.TOKENIZER_FILES):
        assert (run / name).is_file(), name
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    assert "lm_head.weight" in keys and any(k.startswith("mtp.layers.1.") for k in keys)
    assert "backbone.layers.2.mixer.gate.e_score_correction_bias" in keys
    loaded = load_model(run, dtype="float32", strict=True)
    # the trainer's fp32 weights, rounded as the checkpoint stores them
    model = NemotronHForCausalLM(NemotronHConfig.from_dict(TINY))
    model.load_state_dict(torch.load(run / train.STATE_FILE, weights_only=True)["model"])
    reference = train.saved_copy(model)
    ids = torch.randint(12, 4096, (2, 80))
    assert torch.allclose(loaded(ids), reference(ids), atol=1e-4, rtol=0)
    assert not torch.equal(reference.backbone.layers[2].mixer.gate.e_score_correction_bias,
                           torch.zeros(TINY["n_routed_experts"]))


def test_weight_average_follows_the_weights_with_a_growing_decay():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    average = train.WeightAverage(model, decay=0.5)
    want = 0.0
    for n, value in enumerate((10.0, 20.0, 30.0)):
        with torch.no_grad():
            model.weight.fill_(value)
        average.update(model)
        d = min(0.5, (1 + n) / (10 + n))
        want = d * want + (1 - d) * value
    assert torch.allclose(average.averaged_model(model).weight, torch.full((1, 2), want))
    assert torch.equal(model.weight, torch.full((1, 2), 30.0))       # the model itself is left alone


def test_averaged_weights_are_saved_as_a_second_checkpoint(run):
    from nemoh.loader import load_model

    final, averaged = load_model(run, dtype="float32"), load_model(run / "ema", dtype="float32")
    saved = torch.load(run / train.STATE_FILE, weights_only=True)["ema"]
    assert saved["updates"] == 20
    ids = torch.randint(12, 4096, (1, 40))
    assert not torch.allclose(final(ids), averaged(ids), atol=1e-3)
    model = NemotronHForCausalLM(NemotronHConfig.from_dict(TINY))
    model.load_state_dict({**model.state_dict(), **saved["tensors"]})
    assert torch.allclose(averaged(ids), train.saved_copy(model)(ids), atol=1e-4, rtol=0)


def test_score_reply_parses_tool_calls():
    ex = next(e for e in corpus.generate("heldout", 50, 0) if e.expected["type"] == "tool_call")
    call = ex.messages[-1]["tool_calls"][0]["function"]
    args = json.loads(call["arguments"])
    params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in args.items())
    body = f"<tool_call>\n<function={call['name']}>\n{params}</function>\n</tool_call>\n<|im_end|>"
    text = ("reasoning\n</think>\n" if ex.template_kwargs["enable_thinking"] else "") + body
    assert train.score_reply(text, ex)["correct"]
    assert not train.score_reply("I cannot help.<|im_end|>", ex)["correct"]
