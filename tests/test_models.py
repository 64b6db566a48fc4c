"""Model factory: names, weight sources, generic head replacement, data config."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.core.errors import HubUnavailableError, UnknownModelError, WeightsError
from engine.models.factory import ModelSpec, create_model, find_head, model_from_spec, output_shape
from engine.models.registry import resolve

IMAGENET_CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_resnet18_anatomy_numbers_from_the_lesson():
    handle = create_model("tv:resnet18", weights="none")
    assert sum(p.numel() for p in handle.module.parameters()) == 11_689_512
    assert output_shape(handle.module, (3, 224, 224)) == (1, 1000)
    handle10 = create_model("tv:resnet18", weights="none", num_classes=10)
    assert output_shape(handle10.module, (3, 224, 224)) == (1, 10)
    assert handle10.spec.head == "fc"
    assert isinstance(handle10.module.fc, nn.Linear) and handle10.module.fc.in_features == 512


@pytest.mark.parametrize(
    "name, head",
    [
        ("tv:resnet18", "fc"),
        ("tv:mobilenet_v3_small", "classifier.3"),
        ("tv:squeezenet1_0", "classifier.1"),  # a 1x1 conv, not a Linear
        ("tv:vit_b_16", "heads.head"),
        ("timm:test_resnet", "fc"),
        ("timm:test_efficientnet", "classifier"),
        ("timm:test_vit", "head"),
    ],
)
def test_head_is_found_and_replaced_generically(name, head):
    handle = create_model(name, weights="none", num_classes=7)
    assert handle.spec.head == head
    assert handle.spec.num_classes == 7
    assert len(handle.spec.class_names) == 7
    size = handle.spec.input_size
    assert output_shape(handle.module, size, batch=2) == (2, 7)


def test_pretrained_model_has_every_parameter_trainable(default_handle):
    params = list(default_handle.module.parameters())
    assert params and all(p.requires_grad for p in params)


def test_packaged_weights_recognise_real_photos(default_handle, cat_photo, coffee_photo):
    from engine.outputs.predict import predict_files

    cat, coffee = predict_files(default_handle, [cat_photo, coffee_photo], top_k=3)
    assert cat.topk[0].index in IMAGENET_CATS, cat.topk
    assert coffee.topk[0].index in {967, 968}, coffee.topk  # espresso / cup
    assert coffee.topk[0].label == "espresso"
    assert coffee.topk[0].prob > 0.5


def test_packaged_spec_carries_its_own_preprocessing(default_handle):
    spec = default_handle.spec
    assert spec.name == "timm:efficientnet_lite0" and spec.weights == "packaged"
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.5, 0.5, 0.5)
    assert spec.input_size == (3, 224, 224) and spec.interpolation == "bicubic"
    assert spec.class_names[281].startswith("tabby")


def test_packaged_weights_really_loaded(default_handle):
    from engine.models.weights import PACKAGED, read_state_dict

    state = read_state_dict(PACKAGED["efficientnet_lite0"].path())
    ours = default_handle.module.state_dict()
    assert len(state) == len(ours)
    for theirs, mine in zip(state.values(), ours.values()):
        assert torch.equal(theirs, mine)


def test_torchvision_data_config_comes_from_its_weights():
    spec = create_model("tv:resnet18", weights="none").spec
    assert spec.crop_pct == pytest.approx(224 / 256)
    assert spec.class_names[0] == "tench"  # torchvision's own meta['categories']


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UnknownModelError) as err:
        resolve("resnet181")
    assert "resnet18" in str(err.value)
    with pytest.raises(UnknownModelError):
        resolve("foo:resnet18")


def test_bare_name_prefers_timm_and_prefix_selects_source():
    assert resolve("resnet18").qualified == "timm:resnet18"
    assert resolve("tv:resnet18").source == "torchvision"
    assert resolve("alexnet").source == "torchvision"


def test_hub_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORKBENCH_OFFLINE", "1")
    with pytest.raises(HubUnavailableError) as err:
        create_model("timm:test_resnet", weights="hub")
    assert "packaged" in str(err.value) and "offline" in str(err.value)
    with pytest.raises(HubUnavailableError):
        create_model("tv:resnet18", weights="hub")


def test_packaged_missing_for_other_models_names_the_alternatives():
    with pytest.raises(WeightsError) as err:
        create_model("timm:test_resnet", weights="packaged")
    assert "efficientnet_lite0" in str(err.value)


def test_weights_file_roundtrip_safetensors_and_pth(tmp_path):
    from safetensors.torch import save_file

    source = create_model("timm:test_resnet", weights="none")
    x = torch.randn(2, *source.spec.input_size)
    with torch.inference_mode():
        expected = source.module(x)
    st_path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.module.state_dict().items()}, str(st_path))
    pth_path = tmp_path / "w.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.module.state_dict().items()}}, pth_path)
    for path in (st_path, pth_path):
        loaded = create_model("timm:test_resnet", weights=str(path))
        assert loaded.spec.weights == f"file:{path.name}"
        with torch.inference_mode():
            assert torch.allclose(loaded.module(x), expected)


def test_weights_file_with_finetuned_head_resizes_and_reads_class_names(tmp_path):
    import json

    from safetensors.torch import save_file

    tuned = create_model("timm:test_resnet", weights="none", class_names=["ant", "bee", "wasp"])
    path = tmp_path / "tuned.safetensors"
    save_file({k: v.contiguous() for k, v in tuned.module.state_dict().items()}, str(path))
    (tmp_path / "tuned.json").write_text(json.dumps({"class_names": ["ant", "bee", "wasp"]}))
    loaded = create_model("timm:test_resnet", weights=path)
    assert loaded.spec.num_classes == 3
    assert loaded.spec.class_names == ["ant", "bee", "wasp"]


def test_weights_that_do_not_fit_say_how_many_keys_mismatch(tmp_path):
    from safetensors.torch import save_file

    other = create_model("timm:test_vit", weights="none")
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in other.module.state_dict().items()}, str(path))
    with pytest.raises(WeightsError) as err:
        create_model("timm:test_resnet", weights=path)
    message = str(err.value)
    assert "keys missing" in message and "unexpected" in message


def test_weights_file_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": nn.Linear(2, 2)}, path)  # a pickled module, not a state_dict
    with pytest.raises(WeightsError) as err:
        create_model("timm:test_resnet", weights=path)
    assert "evil.pth" in str(err.value)


def test_weights_file_of_wrong_type_or_missing(tmp_path):
    bad = tmp_path / "weights.txt"
    bad.write_text("hello")
    with pytest.raises(WeightsError):
        create_model("timm:test_resnet", weights=bad)
    with pytest.raises(WeightsError):
        create_model("timm:test_resnet", weights=tmp_path / "nope.safetensors")
    with pytest.raises(WeightsError):
        create_model("timm:test_resnet", weights="imagenet")


def test_spec_roundtrips_through_json_and_rebuilds_model():
    handle = create_model("timm:test_efficientnet", weights="none", class_names=["a", "b"])
    spec = ModelSpec.from_dict(__import__("json").loads(handle.spec.to_json()))
    assert spec == handle.spec
    rebuilt = model_from_spec(spec, handle.module.state_dict())
    x = torch.randn(1, *spec.input_size)
    with torch.inference_mode():
        assert torch.allclose(rebuilt.module(x), handle.module(x))
    assert find_head(rebuilt.module) == spec.head


def test_torchvision_models_with_auxiliary_heads_train_on_their_main_head(tmp_path):
    """torchvision builds googlenet (and inception_v3) without weights with auxiliary classifiers, whose
    training forward returns a namedtuple: every training of them was a TypeError. They are built without
    (as torchvision's pretrained googlenet is), and a weights file that has them still loads."""
    from safetensors.torch import save_file
    from torchvision import models as tvm

    from engine.config import TrainConfig
    from engine.freeze.plan import FreezePlan
    from engine.training.loop import fit

    result = fit(TrainConfig(model="tv:googlenet", weights="none", data="digits", image_size=32, batch_size=16,
                             max_per_class=6, num_workers=0, epochs=1, plan=FreezePlan.last(1).to_dict()))
    assert result.status == "finished" and result.epochs_done == 1
    with_aux = tvm.googlenet(weights=None, aux_logits=True, init_weights=False)
    save_file({k: v.contiguous() for k, v in with_aux.state_dict().items()}, tmp_path / "g.safetensors")
    handle = create_model("tv:googlenet", weights=f"file:{tmp_path / 'g.safetensors'}", num_classes=1000,
                          check_output=False)
    assert handle.module.aux1 is None
    assert torch.equal(handle.module.conv1.conv.weight, with_aux.conv1.conv.weight)
