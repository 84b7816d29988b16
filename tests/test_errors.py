"""Bad input raises an error that names the offending argument, on every device, from
the public functions and from the ops themselves."""
import pytest
import torch

import tdpo_ext


def good_inputs(device, n=2, t=4, v=5):
    policy = torch.randn(n, t, v, device=device)
    ref = torch.randn(n, t, v, device=device)
    labels = torch.randint(0, max(v, 1), (n, t), device=device)
    return policy, ref, labels


@pytest.mark.parametrize("which,shape,match", [
    ("policy", (2, 4), r"policy_logits must have shape \(N, T, V\)"),
    ("ref", (2, 3, 5), r"ref_logits shape .* does not match policy_logits"),
    ("ref", (4, 4, 5), r"ref_logits shape .* does not match policy_logits"),
    ("ref", (2, 4, 6), r"vocabulary mismatch: policy_logits has V=5 but ref_logits has V=6"),
    ("labels", (2, 3), r"labels shape .* does not match"),
    ("labels", (2, 4, 1), r"labels must have shape \(N, T\)"),
])
def test_shape_mismatch(device, which, shape, match):
    inputs = dict(zip(("policy", "ref", "labels"), good_inputs(device)))
    inputs[which] = (torch.randint(0, 5, shape, device=device) if which == "labels"
                     else torch.randn(shape, device=device))
    with pytest.raises((RuntimeError, ValueError), match=match):
        tdpo_ext.tdpo_loss(inputs["policy"], inputs["ref"], inputs["labels"])


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float64])
@pytest.mark.parametrize("name", ["policy_logits", "ref_logits"])
def test_logits_must_be_float32_bfloat16_or_float16(device, name, dtype):
    policy, ref, labels = good_inputs(device)
    if name == "policy_logits":
        policy = policy.to(dtype)
    else:
        ref = ref.to(dtype)
    with pytest.raises(RuntimeError, match=f"{name} must be float32, bfloat16 or float16"):
        tdpo_ext.tdpo_loss(policy, ref, labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_labels_must_be_integers(device, dtype):
    policy, ref, labels = good_inputs(device)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        tdpo_ext.tdpo_loss(policy, ref, labels.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.int32])
def test_op_targets_must_be_int64(device, dtype):
    policy, ref, labels = good_inputs(device)
    with pytest.raises(RuntimeError, match="labels must be .*int64"):
        torch.ops.tdpo_ext.token_stats(policy, ref, labels.to(dtype), -100)


@pytest.mark.parametrize("bad_label", [5, 1000, -5, -1])
def test_label_outside_vocabulary(device, bad_label):
    """Anything outside [0, V) that is not ignore_index: above V, and negative values
    other than ignore_index (-1 is a common padding value that is not -100)."""
    policy, ref, labels = good_inputs(device)
    labels[1, 2] = bad_label
    with pytest.raises(RuntimeError, match=rf"labels holds {bad_label} at row 1 .*"
                                           r"outside the vocabulary \[0, 5\)"):
        tdpo_ext.tdpo_loss(policy, ref, labels)


def test_odd_number_of_rows(device):
    with pytest.raises(ValueError, match=r"tdpo_loss needs an even number of rows.*N=3"):
        tdpo_ext.tdpo_loss(*good_inputs(device, n=3))


def test_op_empty_sequence(device):
    policy, ref, labels = good_inputs(device, t=0)
    with pytest.raises(RuntimeError, match="sequence length T must be at least 1"):
        torch.ops.tdpo_ext.token_stats(policy, ref, labels, -100)


def test_empty_sequence(device):
    with pytest.raises(RuntimeError, match="sequence length T must be at least 1"):
        tdpo_ext.tdpo_loss(*good_inputs(device, t=0))


def test_empty_vocabulary(device):
    with pytest.raises(RuntimeError, match="vocabulary size V must be at least 1"):
        tdpo_ext.tdpo_loss(*good_inputs(device, v=0))


def test_unknown_variant(device):
    """The function checks the variant before the op's costly pass, with the op's words."""
    with pytest.raises(ValueError, match="unknown variant 'ipo'") as function_error:
        tdpo_ext.tdpo_loss(*good_inputs(device), variant="ipo")
    with pytest.raises(RuntimeError, match="unknown variant 'ipo'") as op_error:
        torch.ops.tdpo_ext.preference_loss(*torch.zeros(4, 2, device=device), 0.1, 0.5, "ipo")
    assert str(function_error.value) == str(op_error.value).splitlines()[0]


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan")])
def test_beta_must_be_positive(device, beta):
    with pytest.raises(ValueError, match="beta must be > 0"):
        tdpo_ext.tdpo_loss(*good_inputs(device), beta=beta)
    with pytest.raises(RuntimeError, match="beta must be > 0"):
        torch.ops.tdpo_ext.preference_loss(*torch.zeros(4, 2, device=device), beta, 0.5,
                                           "tdpo2")


@pytest.mark.parametrize("index,bad,match", [
    (1, torch.zeros(3), "rejected_logps_margin has 3 pairs but chosen_logps_margin has 2"),
    (2, torch.zeros(2, dtype=torch.float64), "chosen_kl must be float32"),
    (3, torch.zeros(2, 1), r"rejected_kl must be 1-D"),
])
def test_op_pair_inputs(device, index, bad, match):
    pair = list(torch.zeros(4, 2, device=device))
    pair[index] = bad.to(device)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.tdpo_ext.preference_loss(*pair, 0.1, 0.5, "tdpo1")


@pytest.mark.skipif(not (torch.cuda.is_available() and tdpo_ext.built_with_cuda()),
                    reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("moved", ["policy", "ref", "labels"])
def test_tensors_on_different_devices(moved):
    inputs = dict(zip(("policy", "ref", "labels"), good_inputs("cpu")))
    inputs[moved] = inputs[moved].cuda()
    with pytest.raises(RuntimeError, match="policy_logits, ref_logits and labels must be on "
                                           "one device"):
        tdpo_ext.tdpo_loss(inputs["policy"], inputs["ref"], inputs["labels"])


@pytest.mark.parametrize("moved,name", [("ref", "ref_logits"), ("labels", "labels")])
def test_tensors_on_cpu_and_meta(moved, name):
    """Mixed devices, checkable without a GPU through 'meta': the dispatcher then runs
    the fake kernel, which must raise as the device kernels do (and as native ops do),
    not return uninitialized memory."""
    inputs = dict(zip(("policy", "ref", "labels"), good_inputs("cpu")))
    inputs[moved] = inputs[moved].to("meta")
    with pytest.raises(RuntimeError, match=f"must be on one device, got .*{name} on meta"):
        tdpo_ext.tdpo_loss(inputs["policy"], inputs["ref"], inputs["labels"])


def test_pair_inputs_on_cpu_and_meta():
    pair = list(torch.zeros(4, 2))
    pair[3] = pair[3].to("meta")
    with pytest.raises(RuntimeError, match="must be on one device, got .*rejected_kl on meta"):
        torch.ops.tdpo_ext.preference_loss(*pair, 0.1, 0.5, "tdpo1")
