"""apply_fastmem on tiny random models of each family: same loss and gradients as transformers'
own ForCausalLMLoss path, no [B, S, V] logits in training, bit-exact unapply, clear errors."""

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

from fastmem import linear_cross_entropy
from fastmem.integrations.transformers import (apply_fastmem, apply_fastmem_to, is_patched, last_stats,
                                               unapply_fastmem, unapply_fastmem_to)

VOCAB = 97
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = dict(num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.1)
# One tiny random config per supported family (fastmem.integrations.families.FAMILIES), plus the
# variants whose head differs: untied, capped, scaled, a MoE without the router loss.
FAMILIES = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "llama_untied": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "mistral": ("MistralConfig", {}),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, **MOE)),
    "mixtral_no_router_loss": ("MixtralConfig", dict(num_local_experts=4, **{**MOE, "output_router_logits": False})),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", dict(head_dim=8)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=8, num_experts=4, moe_intermediate_size=16, **MOE)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                                         **MOE)),
    "olmoe": ("OlmoeConfig", dict(num_experts=4, **MOE)),
    "gpt_oss": ("GptOssConfig", dict(num_local_experts=4, head_dim=8, **MOE)),
    "phi3": ("Phi3Config", {}),
    "gemma": ("GemmaConfig", dict(head_dim=8)),
    "gemma2": ("Gemma2Config", dict(head_dim=8, final_logit_softcapping=None)),
    "gemma2_softcap": ("Gemma2Config", dict(head_dim=8, final_logit_softcapping=3.0)),
    "gemma3_text": ("Gemma3TextConfig", dict(head_dim=8)),
    "gemma3_text_softcap": ("Gemma3TextConfig", dict(head_dim=8, final_logit_softcapping=2.0)),
    "olmo2": ("Olmo2Config", {}),
    "olmo3": ("Olmo3Config", {}),
    "granite": ("GraniteConfig", dict(logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5)),
    "smollm3": ("SmolLM3Config", {}),
    "glm4": ("Glm4Config", dict(head_dim=8)),
    "gpt_neox (generic path)": ("GPTNeoXConfig", dict(num_hidden_layers=2, use_parallel_residual=True)),
}


def make_model(family: str, seed: int = 0, **overrides):
    config_class, values = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**SMALL, **values, **overrides})
    torch.manual_seed(seed)
    # Weights of a random init are small; scale them so the loss and gradients are not trivially ~uniform.
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.3)
    return model.train()


def batch(seed: int = 1, b: int = 2, s: int = 12):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (b, s), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0  # right padding on the second sample
    labels = input_ids.clone()
    labels[:, :4] = -100  # prompt
    labels[attention_mask == 0] = -100
    return input_ids, attention_mask, labels


def loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_same_grads(got: dict, want: dict):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("num_items", [None, 23])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_sft_loss_and_grads_match_transformers(family, num_items):
    model = make_model(family)
    input_ids, attention_mask, labels = batch()
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    if num_items is not None:
        inputs["num_items_in_batch"] = torch.tensor(num_items)
    ref, ref_grads = loss_and_grads(model, **inputs)
    apply_fastmem(model)
    out, grads = loss_and_grads(model, **inputs)
    assert out.logits is None and ref.logits is not None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert_same_grads(grads, ref_grads)
    if getattr(model.config, "output_router_logits", False):  # MoE: the router loss is in both, and reported
        torch.testing.assert_close(out.aux_loss, ref.aux_loss)
        assert ref.aux_loss.item() > 0
    stats = last_stats(model)
    assert stats.prob.shape == labels.shape  # aligned with the shifted labels
    assert torch.equal(stats.valid, torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:] != -100)


def test_tied_head_gets_gradient_from_both_ends():
    model = make_model("llama")
    assert model.lm_head.weight is model.get_input_embeddings().weight
    input_ids, attention_mask, labels = batch()
    ref, ref_grads = loss_and_grads(model, input_ids=input_ids, labels=labels)
    apply_fastmem(model)
    _, grads = loss_and_grads(model, input_ids=input_ids, labels=labels)
    assert_same_grads(grads, ref_grads)


class MaxLogitRows(TorchDispatchMode):
    """Largest row count of any tensor produced with a last dimension of V (views of the
    model's own parameters, such as the transposed head, excluded)."""

    def __init__(self, model):
        super().__init__()
        self.max_rows = 0
        self.param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(tensor, torch.Tensor) and tensor.dim() >= 2 and tensor.shape[-1] == VOCAB
                    and tensor.untyped_storage().data_ptr() not in self.param_storages):
                self.max_rows = max(self.max_rows, tensor.numel() // VOCAB)
        return out


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])
def test_training_forward_never_builds_full_logits(family):
    model = make_model(family)
    input_ids, attention_mask, labels = batch(b=2, s=40)
    with MaxLogitRows(model) as unpatched:
        model(input_ids=input_ids, labels=labels).loss.backward()
    assert unpatched.max_rows >= 2 * 40  # the check sees HF's [B, S, V] logits

    apply_fastmem(model, chunk_size=8)
    head_calls = []
    model.get_output_embeddings().register_forward_hook(lambda *args: head_calls.append(1))
    with MaxLogitRows(model) as patched:
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        out.loss.backward()
    assert out.logits is None and not head_calls
    assert patched.max_rows <= 8


def test_unapply_restores_original_outputs_bit_for_bit():
    model = make_model("qwen2").eval()
    input_ids, attention_mask, labels = batch()
    with torch.no_grad():
        before = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        before_keep = model(input_ids=input_ids, logits_to_keep=1).logits
    apply_fastmem(model, objective="ot")
    assert is_patched(model)
    with torch.no_grad():
        # Without labels the original forward runs even while patched (generation, logits_to_keep).
        assert torch.equal(model(input_ids=input_ids, logits_to_keep=1).logits, before_keep)
        patched = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert not torch.equal(patched.loss, before.loss)  # OT is another loss
    unapply_fastmem(model)
    assert not is_patched(model) and "forward" not in model.__dict__
    with torch.no_grad():
        after = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert torch.equal(after.loss, before.loss) and torch.equal(after.logits, before.logits)


def test_logits_when_asked_and_in_evaluation():
    model = make_model("mistral")
    input_ids, attention_mask, labels = batch()
    with torch.no_grad():
        ref = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    apply_fastmem(model)
    with torch.no_grad():  # an evaluation loop: logits built by default
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        assert model(input_ids=input_ids, labels=labels, return_logits=False).logits is None
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    train_out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, return_logits=True)
    torch.testing.assert_close(train_out.logits, ref.logits)


@pytest.mark.parametrize("family", ["granite", "gemma2_softcap", "gemma3_text_softcap", "mixtral"])
def test_logits_of_transformed_heads_match(family):
    """Scaled / capped heads and MoE outputs: the logits built on request are the model's own."""
    model = make_model(family)
    input_ids, attention_mask, labels = batch()
    with torch.no_grad():
        ref = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        apply_fastmem(model)
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)


def test_return_dict_false_and_shift_labels():
    model = make_model("qwen3")
    input_ids, attention_mask, labels = batch()
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    ref = model(input_ids=input_ids, labels=labels, shift_labels=shift, return_dict=False)
    apply_fastmem(model)
    out = model(input_ids=input_ids, labels=labels, shift_labels=shift, return_dict=False)
    assert isinstance(out, tuple) and out[0].dim() == 0
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-6)
    # shift_labels is used as given (not shifted again): an all-ignored shift gives a zero loss.
    ignored = torch.full_like(shift, -100)
    assert model(input_ids=input_ids, labels=labels, shift_labels=ignored).loss.item() == 0.0


def test_labels_with_logits_to_keep_is_a_clear_error():
    model = make_model("llama")
    input_ids, _, labels = batch()
    apply_fastmem(model)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(input_ids=input_ids, labels=labels, logits_to_keep=3)


@pytest.mark.parametrize("objective", ["ot", "sw"])
def test_memft_objective_and_stats_through_the_patch(objective):
    model = make_model("gemma3_text")
    input_ids, attention_mask, labels = batch()
    options = dict(threshold=0.3, sw_kappa=5.0, sw_tau=4.0, sw_window=6)
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    want, want_stats = linear_cross_entropy(hidden, model.lm_head.weight, shift, objective=objective,
                                            return_stats=True, **options)
    apply_fastmem(model, objective=objective, **options)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    torch.testing.assert_close(out.loss, want)
    stats = last_stats(model)
    torch.testing.assert_close(stats.prob, want_stats.prob)
    assert torch.equal(stats.correct, want_stats.correct) and torch.equal(stats.first_error, want_stats.first_error)
    # Against the model's own logits: p of each next token, greedy correctness.
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, return_logits=True).logits
    probs = logits.float().softmax(-1).gather(-1, shift.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(stats.prob[stats.valid], probs[stats.valid], rtol=1e-4, atol=1e-6)
    # Gradient accumulation: the micro-batch mean is weighted by its share of the step's tokens.
    n_valid = int(stats.valid.sum())
    scaled = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                   num_items_in_batch=torch.tensor(4 * n_valid))
    torch.testing.assert_close(scaled.loss, want / 4)


def lora(model, targets, dropout=0.0):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets,
                                            init_lora_weights=False))


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "down_proj"], ["gate_proj", "lm_head"]])
def test_peft_lora_grads_match(targets, checkpointing):
    base = make_model("llama_untied")
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = lora(base, targets)
    input_ids, attention_mask, labels = batch()
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                  num_items_in_batch=torch.tensor(17))
    ref, ref_grads = loss_and_grads(model, **inputs)
    assert apply_fastmem(model) is model
    out, grads = loss_and_grads(model, **inputs)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert_same_grads(grads, ref_grads)
    assert all("lora_" in name for name in grads)  # the frozen head got no gradient
    assert last_stats(model) is not None


def test_lora_dropout_on_the_head_is_refused():
    model = lora(make_model("llama_untied"), ["lm_head"], dropout=0.1)
    with pytest.raises(NotImplementedError, match="lora_dropout"):
        apply_fastmem(model)  # in train mode: refused at once
    model.eval()
    apply_fastmem(model)  # dropout is off in eval mode
    model.train()
    input_ids, _, labels = batch()
    with pytest.raises(NotImplementedError, match="lora_dropout"):
        model(input_ids=input_ids, labels=labels)


def test_trl_fused_lm_head_protocol():
    """TRL's SFTTrainer calls model(..., fused_lm_head=True) and reduces -log_probs itself."""
    model = make_model("llama")
    input_ids, attention_mask, labels = batch()
    ref, ref_grads = loss_and_grads(model, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    apply_fastmem(model)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    assert out.log_probs.shape == (2, 11) and torch.equal(out.label_mask, labels[:, 1:] != -100)
    trl_loss = -out.log_probs.sum() / out.label_mask.sum()  # what TRL computes
    torch.testing.assert_close(trl_loss, ref.loss, rtol=1e-5, atol=1e-6)
    trl_loss.backward()
    assert_same_grads({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, ref_grads)
    logp = ref.logits.detach().log_softmax(-1)[:, :-1].gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(out.log_probs[out.label_mask], logp[out.label_mask], rtol=1e-4, atol=1e-5)
    # entropy and top-1 (TRL's entropy / mean_token_accuracy metrics) from the fused pass, no NaN
    full = ref.logits.detach().double()[:, :-1]
    entropy = torch.logsumexp(full, -1) - (full.softmax(-1) * full).sum(-1)
    assert torch.isfinite(out.entropy).all()
    torch.testing.assert_close(out.entropy[out.label_mask].double(), entropy[out.label_mask], rtol=1e-5, atol=1e-6)
    top1 = full.argmax(-1) == labels[:, 1:]
    assert torch.equal(out.is_top1[out.label_mask], top1[out.label_mask])

    apply_fastmem(model, objective="ot", threshold=0.3)
    num_items = torch.tensor(40)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True,
                num_items_in_batch=num_items)
    torch.testing.assert_close(-out.log_probs.sum() / num_items, out.loss)


def test_class_patch_for_models_loaded_later():
    try:
        cls = apply_fastmem_to("llama", objective="sft")
        assert cls is transformers.LlamaForCausalLM
        model = make_model("llama")
        input_ids, _, labels = batch()
        out = model(input_ids=input_ids, labels=labels)
        assert out.logits is None and last_stats(model) is not None
        unapply_fastmem(model)  # this instance opts out of the class patch
        assert model(input_ids=input_ids, labels=labels).logits is not None
    finally:
        unapply_fastmem_to("llama")
    model = make_model("llama")
    assert not is_patched(model) and model(input_ids=input_ids, labels=labels).logits is not None
    with pytest.raises(NotImplementedError, match="gpt2"):
        apply_fastmem_to("gpt2")


def test_unsupported_models_get_a_clear_error():
    classifier = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**SMALL))
    with pytest.raises(NotImplementedError, match="LlamaForSequenceClassification"):
        apply_fastmem(classifier)
    bert = transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                                                num_attention_heads=2, intermediate_size=64))
    with pytest.raises(NotImplementedError, match="BertForMaskedLM"):
        apply_fastmem(bert)
    # A model outside the family table whose head rescales its logits fails the generic probe.
    cohere = transformers.CohereForCausalLM(transformers.CohereConfig(**SMALL, logit_scale=0.5))
    with pytest.raises(NotImplementedError, match="CohereForCausalLM.*cohere.*lm_head"):
        apply_fastmem(cohere)
    # A MoE outside the families whose router loss is on: refused, never dropped (and at
    # forward time when a call turns it on).
    moe = transformers.AutoModelForCausalLM.from_config(transformers.FlexOlmoConfig(**SMALL, num_experts=4, **MOE))
    with pytest.raises(NotImplementedError, match="FlexOlmoForCausalLM.*router loss"):
        apply_fastmem(moe)
    moe.config.output_router_logits = False
    apply_fastmem(moe)
    input_ids, _, labels = batch()
    assert model_loss_is_finite(moe, input_ids, labels)
    with pytest.raises(NotImplementedError, match="router loss"):
        moe(input_ids=input_ids, labels=labels, output_router_logits=True)
    # A soft cap on a model outside the capped families is refused, never dropped.
    capped = make_model("llama")
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="final_logit_softcapping=30.0"):
        apply_fastmem(capped)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        apply_fastmem(torch.nn.Linear(2, 2))


def model_loss_is_finite(model, input_ids, labels) -> bool:
    return bool(torch.isfinite(model(input_ids=input_ids, labels=labels).loss))


def test_bad_options_fail_before_patching():
    model = make_model("llama")
    with pytest.raises(TypeError, match="reduction"):
        apply_fastmem(model, reduction="sum")
    with pytest.raises(ValueError, match="objective"):
        apply_fastmem(model, objective="dpo")
    with pytest.raises(ValueError, match="tau"):
        apply_fastmem(model, objective="sw", sw_tau=0)
    with pytest.raises(ValueError, match="backend"):
        apply_fastmem(model, backend="cuDNN")
    assert not is_patched(model)
    with pytest.raises(ValueError, match="apply_fastmem"):
        last_stats(model)


def test_autocast_runs_the_head_in_the_autocast_dtype(monkeypatch):
    """Under autocast the original lm_head GEMM runs in bf16; the fused op gets bf16 operands too
    (no fp32 [N, V] GEMM), accumulates in fp32, and the loss and gradients follow HF's."""
    import fastmem.integrations.hf_forward as hf_forward

    model = make_model("llama_untied")
    input_ids, attention_mask, labels = batch()
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, ref_grads = loss_and_grads(model, **inputs)
    seen = []
    real = hf_forward.linear_cross_entropy

    def spy(hidden, weight, *args, **kwargs):
        seen.append((hidden.dtype, weight.dtype))
        return real(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(hf_forward, "linear_cross_entropy", spy)
    apply_fastmem(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = loss_and_grads(model, **inputs)
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-2, atol=2e-2)
    assert grads.keys() == ref_grads.keys() and grads["lm_head.weight"].dtype == torch.float32
    for name in ref_grads:  # both sides round the head GEMM to bf16; neither is exact
        cosine = torch.nn.functional.cosine_similarity(grads[name].flatten(), ref_grads[name].flatten(), dim=0)
        assert cosine > 0.99, (name, cosine.item())
    seen.clear()
    _, _ = loss_and_grads(model, **inputs)  # autocast off: the head's own dtype
    assert seen == [(torch.float32, torch.float32)]


def test_trl_protocol_on_a_moe_reports_the_router_loss_apart():
    """TRL reduces -log_probs itself and adds coef * aux_loss from the output: the router loss is
    reported in aux_loss and kept out of log_probs, so the total is HF's loss, counted once."""
    model = make_model("mixtral")
    input_ids, attention_mask, labels = batch()
    ref = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    apply_fastmem(model)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss)
    total = -out.log_probs.sum() / out.label_mask.sum() + model.router_aux_loss_coef * out.aux_loss
    torch.testing.assert_close(total, ref.loss, rtol=1e-5, atol=1e-6)
