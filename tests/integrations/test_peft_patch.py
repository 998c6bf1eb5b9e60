"""patch_peft_model / unpatch_peft_model on PEFT models, and the LoRALinear module against
PEFT's lora.Linear (outputs, adapter gradients, dropout through the fused op, state-dict keys)."""

import logging

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import Linear as PeftLoraLinear

import fastmem.integrations.peft as peft_integration
from fastmem.integrations.peft import is_patched, patch_peft_model, unpatch_peft_model
from fastmem.nn.lora_linear import LoRALinear
from fastmem.ops.lora_linear import lora_dropout_mask
from fastmem.ops.lora_linear_checks import SEED_LIMIT
from fastmem.ops.lora_linear_torch import eager_lora_linear

BACKENDS = ["torch", "triton"]
TARGETS = ["down_proj", "up_proj", "q_proj"]


def peft_llama(tiny_llama, dtype=torch.float32, lora_dropout=0.1, seed=0):
    model = get_peft_model(tiny_llama.to(dtype), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                            lora_dropout=lora_dropout))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B = 0 at init would hide every LoRA term and A's gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return model


def step(model, input_ids):
    """Logits, loss and every adapter gradient of one forward + backward."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    adapter_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), adapter_grads


def max_rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def count_fused_calls(monkeypatch):
    calls = []
    real = peft_integration.lora_linear

    def spy(*args, **kwargs):
        calls.append(kwargs.get("dropout"))
        return real(*args, **kwargs)

    monkeypatch.setattr(peft_integration, "lora_linear", spy)
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["eval-with-dropout", "train-dropout-0"])
def test_patched_model_matches_unpatched(tiny_llama, backend, mode, device, monkeypatch):
    model = peft_llama(tiny_llama.to(device), lora_dropout=0.1 if mode == "eval-with-dropout" else 0.0)
    model.train(mode == "train-dropout-0")
    input_ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(3)).to(device)
    logits0, loss0, grads0 = step(model, input_ids)

    calls = count_fused_calls(monkeypatch)
    n_lora = sum(type(m) is PeftLoraLinear for m in model.modules())
    assert patch_peft_model(model, backend=backend) == n_lora == 4 * len(TARGETS)
    assert all(is_patched(m) for m in model.modules() if type(m) is PeftLoraLinear)
    logits1, loss1, grads1 = step(model, input_ids)
    assert calls == [0.0] * n_lora  # every LoRA layer ran fused, with dropout off
    assert max_rel(logits1, logits0) < 1e-5 and abs(loss1 - loss0) < 1e-5
    assert grads1.keys() == grads0.keys() and len(grads0) == 2 * n_lora
    for name in grads0:
        assert max_rel(grads1[name], grads0[name]) < 1e-4, name

    assert unpatch_peft_model(model) == n_lora
    assert not any(is_patched(m) or "forward" in vars(m) for m in model.modules())
    calls.clear()
    logits2, _, _ = step(model, input_ids)
    assert calls == [] and torch.equal(logits2, logits0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_model_with_fp32_adapters(tiny_llama, backend, device):
    """PEFT keeps adapters in fp32 under a bf16 base; patched, the branch runs in bf16 and the
    adapter gradients still come back in fp32."""
    model = peft_llama(tiny_llama.to(device), dtype=torch.bfloat16, lora_dropout=0.0)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    input_ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(4)).to(device)
    logits0, loss0, grads0 = step(model, input_ids)
    patch_peft_model(model, backend=backend)
    logits1, loss1, grads1 = step(model, input_ids)
    assert max_rel(logits1, logits0) < 3e-2 and abs(loss1 - loss0) < 3e-2
    for name in grads0:
        assert grads1[name].dtype == torch.float32
        assert max_rel(grads1[name], grads0[name]) < 6e-2, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_dropout_runs_fused_with_a_reproducible_mask(backend, device):
    """In train mode the patched layer applies the op's own seeded mask (drawn from torch's
    default generator), the same one in forward and backward."""
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 10, device=device).requires_grad_(False)
    layer = PeftLoraLinear(base, "default", config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5), r=4,
                           lora_alpha=8).train()
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    patch_peft_model(layer, backend=backend)
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(3, 5, 24, device=device, requires_grad=True)
    grad_out = torch.randn(3, 5, 10, device=device)

    torch.manual_seed(42)
    y = layer(x)
    got = torch.autograd.grad(y, (x, lora_A, lora_B), grad_out)
    torch.manual_seed(42)
    seed = int(torch.randint(0, SEED_LIMIT, ()))
    keep = lora_dropout_mask(15, 24, 0.5, seed, device=device, backend=backend).reshape(3, 5, 24)
    y_ref = eager_lora_linear(x, base.weight, lora_A, lora_B, 2.0, base.bias, keep, 0.5)
    want = torch.autograd.grad(y_ref, (x, lora_A, lora_B), grad_out)
    assert max_rel(y, y_ref) < 1e-5
    for g, g_ref in zip(got, want):
        assert max_rel(g, g_ref) < 1e-5
    layer.eval()
    assert max_rel(layer(x), eager_lora_linear(x, base.weight, lora_A, lora_B, 2.0, base.bias)) < 1e-5


def test_uncovered_calls_fall_back_to_peft(tiny_llama, monkeypatch):
    model = peft_llama(tiny_llama).eval()
    input_ids = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        with model.disable_adapter():
            base_logits = model(input_ids=input_ids).logits
        lora_logits = model(input_ids=input_ids).logits
    patch_peft_model(model, backend="torch")
    calls = count_fused_calls(monkeypatch)
    with torch.no_grad():
        with model.disable_adapter():
            assert torch.equal(model(input_ids=input_ids).logits, base_logits)
        model.merge_adapter()
        assert max_rel(model(input_ids=input_ids).logits, lora_logits) < 1e-5
        model.unmerge_adapter()
        assert calls == []
        assert max_rel(model(input_ids=input_ids).logits, lora_logits) < 1e-5
        assert len(calls) == 4 * len(TARGETS)


def test_save_pretrained_after_patch(tiny_llama, tmp_path):
    model = peft_llama(tiny_llama).eval()
    patch_peft_model(model)
    model.save_pretrained(tmp_path)
    input_ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = model(input_ids=input_ids).logits
    saved_keys = set(get_peft_model_state_dict(model))

    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    torch.manual_seed(0)  # the same base weights as the tiny_llama fixture
    reloaded = PeftModel.from_pretrained(LlamaForCausalLM(tiny_llama_config()).eval(), tmp_path)
    assert set(get_peft_model_state_dict(reloaded)) == saved_keys
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=input_ids).logits, want)


def test_patch_rejects_unknown_backend(tiny_llama):
    with pytest.raises(ValueError, match="backend must be one of"):
        patch_peft_model(peft_llama(tiny_llama), backend="fast")


# ---- LoRALinear: the same layer as a plain module ------------------------------------------

def peft_layer_and_module(r=4, alpha=8, dropout=0.0, bias=True, use_rslora=False):
    torch.manual_seed(r)
    base = torch.nn.Linear(20, 12, bias=bias).requires_grad_(False)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora)
    peft_layer = PeftLoraLinear(base, "default", config=config, r=r, lora_alpha=alpha, use_rslora=use_rslora)
    torch.nn.init.normal_(peft_layer.lora_B["default"].weight)
    module = LoRALinear.from_linear(base, r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora)
    # PEFT's adapter keys without the adapter name are exactly the module's.
    adapter = {k.replace(".default", ""): v for k, v in peft_layer.state_dict().items() if "lora_" in k}
    module.load_state_dict(adapter, strict=False)
    return peft_layer, module


@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha/r", "rslora"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_lora_linear_module_matches_peft(bias, use_rslora):
    peft_layer, module = peft_layer_and_module(r=4, alpha=6, dropout=0.2, bias=bias, use_rslora=use_rslora)
    peft_layer.eval()
    module.eval()
    assert module.scaling == peft_layer.scaling["default"]
    x = torch.randn(2, 3, 20)
    y_peft, y = peft_layer(x), module(x)
    assert max_rel(y, y_peft) < 1e-6
    y_peft.square().sum().backward()
    y.square().sum().backward()
    for name in ("lora_A", "lora_B"):
        want = getattr(peft_layer, name)["default"].weight.grad
        assert max_rel(getattr(module, name).weight.grad, want) < 1e-5
    assert module.weight.grad is None and not module.weight.requires_grad


def test_lora_linear_module_state_dict_and_init():
    base = torch.nn.Linear(20, 12)
    module = LoRALinear.from_linear(base, r=3)
    assert set(module.state_dict()) == {"weight", "bias", "lora_A.weight", "lora_B.weight"}
    assert module.weight is base.weight and not base.weight.requires_grad  # shared and frozen
    assert [n for n, p in module.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]
    x = torch.randn(4, 20)
    assert torch.allclose(module(x), base(x), atol=1e-6)  # B = 0: a fresh adapter changes nothing
    fresh = LoRALinear(20, 12, r=3)
    fresh.load_state_dict(module.state_dict())
    assert torch.equal(fresh(x), module(x))
    with pytest.raises(ValueError, match="r must be an int >= 1"):
        LoRALinear(20, 12, r=0)
    with pytest.raises(ValueError, match="lora_dropout must be in"):
        LoRALinear(20, 12, r=2, lora_dropout=1.0)
    with pytest.raises(TypeError, match="must be an nn.Linear"):
        LoRALinear.from_linear(torch.nn.Conv1d(2, 2, 1))


def test_lora_linear_module_dropout_only_in_training():
    _, module = peft_layer_and_module(r=4, dropout=0.5)
    x = torch.randn(64, 20)
    module.eval()
    y_eval = module(x)
    module.train()
    torch.manual_seed(9)
    y_train = module(x)
    torch.manual_seed(9)
    keep = lora_dropout_mask(64, 20, 0.5, int(torch.randint(0, SEED_LIMIT, ())), backend="torch")
    lora_A, lora_B = module.lora_A.weight, module.lora_B.weight
    want = eager_lora_linear(x, module.weight, lora_A, lora_B, module.scaling, module.bias, keep, 0.5)
    assert max_rel(y_train, want) < 1e-5 and not torch.allclose(y_train, y_eval)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_runs_fused_in_the_autocast_dtype(tiny_llama, backend, device, monkeypatch):
    """Under autocast the patched layers stay on the fused op, with every GEMM in bf16 as
    autocast runs PEFT's layer; logits, loss and the fp32 adapter gradients follow PEFT's."""
    model = peft_llama(tiny_llama.to(device), lora_dropout=0.0)
    input_ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(6)).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        logits0, loss0, grads0 = step(model, input_ids)
    patch_peft_model(model, backend=backend)
    seen = []
    real = peft_integration.lora_linear

    def spy(x, weight, lora_A, lora_B, *args, **kwargs):
        seen.append({x.dtype, weight.dtype, lora_A.dtype, lora_B.dtype})
        return real(x, weight, lora_A, lora_B, *args, **kwargs)

    monkeypatch.setattr(peft_integration, "lora_linear", spy)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        logits1, loss1, grads1 = step(model, input_ids)
    assert seen == [{torch.bfloat16}] * (4 * len(TARGETS))
    assert logits1.dtype == logits0.dtype
    assert max_rel(logits1, logits0) < 3e-2 and abs(loss1 - loss0) < 3e-2
    for name in grads0:
        assert grads1[name].dtype == torch.float32
        assert max_rel(grads1[name], grads0[name]) < 6e-2, name


def test_fallback_is_logged_once_per_reason(tiny_llama, monkeypatch, caplog):
    monkeypatch.setattr(peft_integration, "_logged_fallbacks", set())
    model = peft_llama(tiny_llama).eval()
    patch_peft_model(model, backend="torch")
    input_ids = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(5))
    base_layer = next(m for m in model.modules() if type(m) is PeftLoraLinear)
    with caplog.at_level(logging.INFO, logger="fastmem"), torch.no_grad():
        for _ in range(2):
            with model.disable_adapter():
                model(input_ids=input_ids)
        base_layer.fan_in_fan_out = True  # a capability gap: a warning, once
        for _ in range(2):
            base_layer(torch.randn(3, base_layer.in_features).t().contiguous().t())
        base_layer.fan_in_fan_out = False
        model(input_ids=input_ids)  # fused again: nothing logged
    records = [(r.levelno, r.getMessage()) for r in caplog.records if "PEFT's own forward" in r.getMessage()]
    assert [level for level, _ in records] == [logging.INFO, logging.WARNING]
    assert "adapters are disabled" in records[0][1] and "fan_in_fan_out" in records[1][1]
