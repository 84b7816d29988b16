"""lm_head_of: finding a Hugging Face causal LM's body and linear LM head for
fused_linear_tdpo_loss, and refusing the heads it cannot fuse. Needs transformers (skipped
without it; the fused loss's own tests in test_fused_linear.py do not)."""
import pytest
import torch

from tdpo_ext import fused_linear_tdpo_loss, tdpo_loss
from tdpo_ext.fused_linear import lm_head_of

transformers = pytest.importorskip("transformers")


def _tiny_llama(tied: bool):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_lm_head_of_llama(tied):
    model = _tiny_llama(tied)
    ids = torch.randint(0, 64, (4, 7))
    body, weight, bias = lm_head_of(model, verify_input_ids=ids[:1])
    assert weight is model.lm_head.weight and bias is None
    assert (weight is model.get_input_embeddings().weight) == tied
    ref_model = _tiny_llama(tied)
    labels = ids.clone()
    labels[:, :2] = -100
    with torch.no_grad():
        ref_hidden = lm_head_of(ref_model)[0](input_ids=ids).last_hidden_state
    fused = fused_linear_tdpo_loss(body(input_ids=ids).last_hidden_state, weight, ref_hidden,
                                   ref_model.lm_head.weight, labels, chunk_size=5)
    expected = tdpo_loss(model(input_ids=ids).logits, ref_model(input_ids=ids).logits.detach(),
                         labels)
    torch.testing.assert_close(fused.loss, expected.loss, rtol=1e-5, atol=1e-6)


def test_lm_head_of_refuses_softcapping():
    config = transformers.Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=1, num_attention_heads=2,
                                       num_key_value_heads=1, head_dim=8,
                                       final_logit_softcapping=30.0)
    with pytest.raises(ValueError, match="Gemma2ForCausalLM.*final_logit_softcapping"):
        lm_head_of(transformers.Gemma2ForCausalLM(config))


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

    config = _tiny_llama(False).config
    model = ScaledLlama(config).eval()
    lm_head_of(model)  # nothing in its config says so...
    with pytest.raises(ValueError, match="ScaledLlama.*differs from model"):
        lm_head_of(model, verify_input_ids=torch.randint(0, 64, (1, 5)))
