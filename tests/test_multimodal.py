"""Image-and-text models (Llava, Gemma 3, Mistral 3, Qwen2.5-VL; Qwen3-VL and Llama 4 text) on the fast path.

The XLA case runs ``tests/xla_scripts/vlm_check.py`` in a fresh process: tiny random-weight models (a tiny
text config + a tiny vision config), CPU stock ``generate`` as the reference, computed there before the
patch. The planning tests at the bottom need neither torch_xla nor a subprocess.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from tests.xla_run import run_script

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from xla_cache_patch.fastgen import multimodal  # noqa: E402


@pytest.mark.xla
@pytest.mark.slow
def test_text_and_image_prompts_match_cpu_generate() -> None:
    """Left-padded batches of 2, greedy, 8 and 64 new tokens: text prompts, and image+text prompts (one
    image per row) for Llava, Gemma 3 (its bidirectional mask over an image's tokens changes the logits)
    and Qwen2.5-VL (3-D rope); tokens equal and logits within 1e-4 of CPU stock generate. Graphs: 8 and 64
    tokens compile the same (the 64-token call only the graphs of its longer cache), and other pixel
    values of the same shape compile none."""
    pytest.importorskip("torch_xla")
    result = run_script("vlm_check.py", "llava", "gemma3", "qwen2_5_vl", "--tokens", "8,64", timeout=900)
    families = result["families"]
    for family in ("llava", "gemma3", "qwen2_5_vl"):
        cases = families[family]["cases"]
        for name, case in cases.items():
            assert case["took"] == ["fast"], (family, name, case)
            assert case["equal"] and case["logits_diff_max"] < 1e-4, (family, name, case)
        assert cases["image-new-pixels/8"]["graphs"] == 0
    llava, gemma3, qwen = (families[f]["cases"] for f in ("llava", "gemma3", "qwen2_5_vl"))
    # image/8: the image prefill, transformers' two placeholder-count checks (host reads) and the decode
    # graphs of its cache; image/64 then only its prefill (its cache length's decode came with text/64)
    assert [llava[c]["graphs"] for c in ("text/8", "text/64", "image/8", "image/64")] == [3, 3, 5, 1]
    # as Gemma3ForCausalLM: sliding layers (window 16) add graphs once 64 tokens pass the window
    assert [gemma3[c]["graphs"] for c in ("text/8", "text/64", "image/8", "image/64")] == [4, 6, 3, 1]
    # 3-D rope positions from get_rope_index on the host, decode offset by rope_deltas; the placeholder
    # checks' graphs (a count of input_ids) were compiled for the families before (3, 3, 3, 1 alone)
    assert [qwen[c]["graphs"] for c in ("text/8", "text/64", "image/8", "image/64")] == [2, 2, 1, 1]


# Planning: the family table's refusals, without a device.


def _rope_index(input_ids: Any, mm_token_type_ids: Any, image_grid_thw: Any = None, **kwargs: Any) -> Any:
    raise AssertionError("not reached")


def _model(model_type: str, **config: Any) -> Any:
    text = SimpleNamespace()
    values = {"model_type": model_type, "image_token_id": 250, **config}
    inner = SimpleNamespace(get_placeholder_mask=None, get_rope_index=_rope_index)
    config = SimpleNamespace(get_text_config=lambda decoder=False: text, **values)
    return SimpleNamespace(config=config, model=inner)


def _ids() -> Any:
    return torch.tensor([[255, 5, 250, 250, 6], [7, 250, 250, 8, 9]])


def _mask() -> Any:
    return torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])


def test_unknown_family_is_refused() -> None:
    with pytest.raises(multimodal.Refused, match="no rules for"):
        multimodal.family(_model("llava_next"))


def test_video_is_refused() -> None:
    kwargs = {"pixel_values_videos": torch.zeros(4, 8), "video_grid_thw": torch.ones(1, 3)}
    with pytest.raises(multimodal.Refused, match="pixel_values_videos"):
        multimodal.take_inputs(_model("qwen2_5_vl"), kwargs, _ids(), _mask(), 255)


def test_qwen3_vl_images_are_refused_with_their_reason() -> None:
    kwargs = {"pixel_values": torch.zeros(32, 384), "image_grid_thw": torch.ones(2, 3)}
    with pytest.raises(multimodal.Refused, match="deepstack"):
        multimodal.take_inputs(_model("qwen3_vl"), kwargs, _ids(), _mask(), 255)


def test_qwen2_5_vl_images_need_their_rope_inputs() -> None:
    kwargs = {"pixel_values": torch.zeros(32, 384), "image_grid_thw": torch.ones(2, 3)}
    with pytest.raises(multimodal.Refused, match="mm_token_type_ids"):
        multimodal.take_inputs(_model("qwen2_5_vl"), kwargs, _ids(), _mask(), 255)


def test_zero_token_types_on_a_text_prompt_are_dropped() -> None:
    kwargs = {"token_type_ids": torch.zeros(2, 5, dtype=torch.long)}
    inputs = multimodal.take_inputs(_model("gemma3"), kwargs, _ids(), _mask(), 255)
    assert not inputs and kwargs == {}


def test_token_types_without_pixels_are_refused() -> None:
    kwargs = {"token_type_ids": torch.ones(2, 5, dtype=torch.long)}
    with pytest.raises(multimodal.Refused, match="no pixel_values"):
        multimodal.take_inputs(_model("gemma3"), kwargs, _ids(), _mask(), 255)


def test_pad_equal_to_the_image_token_is_refused() -> None:
    kwargs = {"pixel_values": torch.zeros(2, 3, 32, 32)}
    with pytest.raises(multimodal.Refused, match="pad token is the image token"):
        multimodal.take_inputs(_model("llava"), kwargs, _ids(), _mask(), 250)


def test_uncovered_media_of_a_covered_family_are_refused() -> None:
    kwargs = {"pixel_values": torch.zeros(2, 3, 32, 32), "pixel_attention_mask": torch.ones(2, 32, 32)}
    with pytest.raises(multimodal.Refused, match="pixel_attention_mask"):
        multimodal.take_inputs(_model("gemma3"), kwargs, _ids(), _mask(), 255)


def test_token_types_are_left_padded_with_the_prompt() -> None:
    ids = _ids()
    kwargs = {"pixel_values": torch.zeros(2, 3, 32, 32), "token_type_ids": (ids == 250).long()}
    inputs = multimodal.take_inputs(_model("gemma3"), kwargs, ids, _mask(), 255)
    assert kwargs == {}
    prefill = inputs.prefill_kwargs(8, torch.device("cpu"))
    assert prefill["token_type_ids"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1, 0, 0]]
    assert prefill["pixel_values"].shape == (2, 3, 32, 32)


def test_qwen2_5_vl_images_need_5x_rope_index() -> None:
    model = _model("qwen2_5_vl")
    model.model.get_rope_index = lambda input_ids, image_grid_thw=None, attention_mask=None: None  # 4.5x
    kwargs = {"pixel_values": torch.zeros(32, 384), "image_grid_thw": torch.ones(2, 3)}
    with pytest.raises(multimodal.Refused, match="rope_deltas on the model"):
        multimodal.take_inputs(model, kwargs, _ids(), _mask(), 255)


def test_images_without_placeholder_merge_are_refused() -> None:
    model = _model("llava")
    del model.model.get_placeholder_mask  # before 4.55: merged inside the model
    with pytest.raises(multimodal.Refused, match=r"4\.55"):
        multimodal.take_inputs(model, {"pixel_values": torch.zeros(2, 3, 32, 32)}, _ids(), _mask(), 255)


def test_image_sizes_stay_on_the_host() -> None:
    kwargs = {"pixel_values": torch.zeros(2, 3, 32, 32), "image_sizes": torch.tensor([[32, 32]] * 2)}
    inputs = multimodal.take_inputs(_model("mistral3"), kwargs, _ids(), _mask(), 255)
    assert inputs.host == ("image_sizes",)
