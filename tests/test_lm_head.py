"""lm_head_of and logit_transform_of on transformers causal LMs: the fused loss of the
LMHead they find equals tdpo_loss on the model's own logits, and heads that cannot be
fused are refused by name."""
from __future__ import annotations

import pytest
import torch

from tdpo_ext import fused_linear_tdpo_loss, tdpo_loss
from tdpo_ext.lm_head import lm_head_of, logit_transform_of

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
             num_attention_heads=2, num_key_value_heads=2)


def _tiny_llama(tied: bool):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SMALL, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config).eval()


def _tiny_gemma2(softcap):
    torch.manual_seed(0)
    config = transformers.Gemma2Config(**dict(SMALL, num_key_value_heads=1), head_dim=8,
                                       final_logit_softcapping=softcap)
    return transformers.Gemma2ForCausalLM(config).eval()


def _tiny_cohere(logit_scale):
    torch.manual_seed(0)
    config = transformers.CohereConfig(**SMALL, logit_scale=logit_scale)
    return transformers.CohereForCausalLM(config).eval()


def _fused_equals_model_logits(make_model):
    """The fused loss of two models' LMHeads against tdpo_loss on their logits."""
    model, ref_model = make_model(), make_model()
    with torch.no_grad():  # a policy unlike the reference
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(0, 64, (4, 7))
    labels = ids.clone()
    labels[:, :2] = -100
    head = lm_head_of(model, verify_input_ids=ids[:1])
    ref_head = lm_head_of(ref_model)
    with torch.no_grad():
        ref_hidden = ref_head.body(input_ids=ids).last_hidden_state
    fused = fused_linear_tdpo_loss(head.body(input_ids=ids).last_hidden_state, head.weight,
                                   ref_hidden, ref_head.weight, labels, chunk_size=5,
                                   logit_scale=head.logit_scale,
                                   logit_softcap=head.logit_softcap)
    expected = tdpo_loss(model(input_ids=ids).logits,
                         ref_model(input_ids=ids).logits.detach(), labels)
    for name in ("loss", "chosen_kl", "rejected_kl", "chosen_rewards"):
        torch.testing.assert_close(getattr(fused, name), getattr(expected, name), rtol=1e-5,
                                   atol=1e-5)
    return head


@pytest.mark.parametrize("tied", [True, False])
def test_lm_head_of_llama(tied):
    head = _fused_equals_model_logits(lambda: _tiny_llama(tied))
    assert head.bias is None and (head.logit_scale, head.logit_softcap) == (1.0, None)


def test_softcapped_head():
    model = _tiny_gemma2(2.0)  # a cap low enough to change these logits
    assert logit_transform_of(model) == (1.0, 2.0)
    _fused_equals_model_logits(lambda: _tiny_gemma2(2.0))


def test_scaled_head():
    assert logit_transform_of(_tiny_cohere(0.25)) == (0.25, None)
    _fused_equals_model_logits(lambda: _tiny_cohere(0.25))


def test_config_scales():
    class Config:
        model_type = "granite"
        logits_scaling = 4.0
    model = torch.nn.Module()
    model.config = Config()
    assert logit_transform_of(model) == (0.25, None)
    Config.model_type = "hyperclovax"
    assert logit_transform_of(model) == (4.0, None)
    Config.mup_enabled = True
    with pytest.raises(ValueError, match="Module.*mup_enabled=True"):
        logit_transform_of(model)


def test_lm_head_of_refuses_non_linear_head():
    model = _tiny_llama(False)
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(ValueError, match="LlamaForCausalLM.*not a plain torch.nn.Linear"):
        lm_head_of(model)


def test_lm_head_of_verify_catches_hidden_scaling():
    class ScaledLlama(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    model = ScaledLlama(_tiny_llama(False).config).eval()
    lm_head_of(model)  # nothing in its config says so...
    with pytest.raises(ValueError, match="ScaledLlama.*differs from model"):
        lm_head_of(model, verify_input_ids=torch.randint(0, 64, (1, 5)))


def test_verify_catches_a_forward_that_changes_the_body_inputs():
    """verify_lm_head reads the body's output from the model's own forward only when the
    forward called the body as the fused head will; here it passes scaled embeddings, which
    body(input_ids=...) would not see."""
    class ScaledEmbeddingsLlama(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, **kwargs):
            embeds = self.get_input_embeddings()(input_ids) * 2
            return super().forward(inputs_embeds=embeds, **kwargs)

    model = ScaledEmbeddingsLlama(_tiny_llama(False).config).eval()
    with pytest.raises(ValueError, match="ScaledEmbeddingsLlama.*differs from model"):
        lm_head_of(model, verify_input_ids=torch.randint(0, 64, (1, 5)))
