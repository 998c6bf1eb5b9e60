"""Evaluator test helpers: a tiny llama with peaked predictions and an oracle from full logits."""

import torch

from fastmem.data.sample import MemorySample


def make_confident(model, head_std: float = 0.8, seed: int = 1):
    """Give the shared `tiny_llama` (frozen, in place) its own random head of larger scale.
    Its tied head gives near-uniform p ≈ 1/97 and, scaled, just repeats the last token; an
    untied head with std `head_std` gives varied, peaked predictions, so that both recalled
    (p > 0.5) and stubborn tokens occur."""
    model.eval().requires_grad_(False)
    head = model.get_output_embeddings()
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(head.weight.shape, generator=generator) * head_std
    head.weight = torch.nn.Parameter(weight, requires_grad=False)
    model.config.tie_word_embeddings = False  # saved and reloaded, the head stays its own
    return model


def greedy_continuation(model, prompt, n):
    """The model's own greedy answer, by full forwards without a cache (the oracle)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


def oracle_scores(model, sample: MemorySample):
    """p, argmax-correctness and target rank of each answer token from full HF logits."""
    with torch.no_grad():
        logits = model(torch.tensor([sample.input_ids])).logits[0].double()
    start = len(sample.prompt_ids) - 1
    rows = logits[start:start + sample.answer_len]
    target = torch.tensor(sample.answer_ids)
    prob = rows.softmax(-1).gather(1, target[:, None]).squeeze(1)
    target_logit = rows.gather(1, target[:, None])
    rank = (rows > target_logit).sum(1)
    correct = rows.argmax(-1) == target
    return prob, correct, rank


def make_sample(name, prompt, answer):
    return MemorySample(name=name, prompt=" ".join(map(str, prompt)), answer=" ".join(map(str, answer)),
                        prompt_ids=tuple(prompt), answer_ids=tuple(answer))
