"""Batching: left padding, loss masks, image normalisation, fixed shapes for the last batch."""

from __future__ import annotations

import numpy as np
import pytest

from sparsevlm.config import VisionConfig
from sparsevlm.data.batch import EncodedSet, collate, iterate_batches, pack_by_image, preprocess_images


def test_collate_left_pads_and_marks_targets():
    vision = VisionConfig()
    images = np.full((2, 48, 48, 3), 255, np.uint8)
    batch = collate(images, [([2, 10, 11, 20, 3], 3), ([2, 12, 21, 3], 2)], 6, 0, vision)
    np.testing.assert_array_equal(batch.tokens, [[0, 2, 10, 11, 20, 3], [0, 0, 2, 12, 21, 3]])
    np.testing.assert_array_equal(batch.text_mask, [[0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    np.testing.assert_array_equal(batch.loss_mask, [[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1]])
    np.testing.assert_allclose(batch.images, 1.0)  # (1 - 0.5) / 0.5


def test_collate_rejects_too_long_sequences():
    with pytest.raises(ValueError, match="does not fit length=3"):
        collate(np.zeros((1, 48, 48, 3), np.uint8), [([1, 2, 3, 4], 2)], 3, 0, VisionConfig())


def test_preprocess_resizes_other_sizes_bicubically():
    from PIL import Image

    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = preprocess_images(image[None], VisionConfig())
    want = np.asarray(Image.fromarray(image).resize((48, 48), Image.BICUBIC), np.float32) / 255.0
    np.testing.assert_allclose(out[0], (want - 0.5) / 0.5, atol=1e-6)


def test_iterate_batches_keeps_shapes_and_covers_every_example():
    data = EncodedSet(
        images=np.zeros((3, 48, 48, 3), np.uint8),
        image_index=np.array([0, 1, 2, 0, 1]),
        sequences=[([2, i + 4, 3], 2) for i in range(5)],
        question_types=["x"] * 5,
        answers=["a"] * 5,
        questions=["q"] * 5,
    )
    seen = []
    for batch, indices in iterate_batches(data, 2, 4, 0, VisionConfig()):
        assert batch.tokens.shape == (2, 4)
        seen.extend(indices.tolist())
    assert sorted(seen) == [0, 1, 2, 3, 4]
    shuffled = [i for _, idx in iterate_batches(data, 2, 4, 0, VisionConfig(), np.random.default_rng(0), True)
                for i in idx]
    assert len(shuffled) == 4 and len(set(shuffled)) == 4


def test_fit_image_follows_the_hf_image_processor():
    from transformers import CLIPImageProcessor

    from sparsevlm.data.batch import fit_image

    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    image = np.random.default_rng(1).integers(0, 256, (40, 64, 3), dtype=np.uint8)  # not square: resize + crop
    fitted = fit_image(image, 32, processor)
    assert fitted.shape == (32, 32, 3) and fitted.dtype == np.uint8
    config = VisionConfig(image_size=32, patch_size=8, image_mean=tuple(processor.image_mean),
                          image_std=tuple(processor.image_std))
    want = np.moveaxis(processor(image, return_tensors="np")["pixel_values"][0], 0, -1)
    # Only the rounding to uint8 between resize and normalisation differs: half a level over std.
    np.testing.assert_allclose(preprocess_images(fitted[None], config)[0], want, atol=0.6 / 255 / min(processor.image_std))


def test_mixed_image_sizes_stack_once_fitted():
    import datasets
    from PIL import Image

    from sparsevlm.data.batch import encode_vqa
    from sparsevlm.data.tokenize import build_word_tokenizer

    images = [Image.fromarray(np.full((h, w, 3), 50, np.uint8)) for h, w in ((20, 30), (48, 48))]
    dataset = datasets.Dataset.from_dict(
        {"image": images, "image_id": [0, 1], "question": ["what ?", "what ?"], "answer": ["red", "red"]},
        features=datasets.Features({"image": datasets.Image(), "image_id": datasets.Value("int64"),
                                    "question": datasets.Value("string"), "answer": datasets.Value("string")}),
    )
    tokenizer = build_word_tokenizer(["what", "?", "red"])
    with pytest.raises(ValueError, match="images have 2 different shapes"):
        encode_vqa(dataset, tokenizer, with_targets=True)
    assert encode_vqa(dataset, tokenizer, with_targets=True, image_size=48).images.shape == (2, 48, 48, 3)


def _encoded(sequences: list[tuple[list[int], int]], image_index: list[int], images: int = 2) -> EncodedSet:
    n = len(sequences)
    return EncodedSet(np.zeros((images, 48, 48, 3), np.uint8), np.asarray(image_index), sequences, ["vqa"] * n,
                      [""] * n, [""] * n)


def test_pack_by_image_puts_each_image_texts_in_one_row_numbered_by_segment():
    data = _encoded([([2, 10, 20, 3], 2), ([2, 11, 3], 2), ([2, 12, 21, 22, 3], 2)], [1, 0, 1])
    packed = pack_by_image(data)
    assert len(packed) == 2 and packed.max_length == 9
    batch = packed.collate(np.array([1, 0]), 10, 0, VisionConfig())
    np.testing.assert_array_equal(batch.tokens, [[0, 2, 10, 20, 3, 2, 12, 21, 22, 3],
                                                 [0, 0, 0, 0, 0, 0, 0, 2, 11, 3]])
    np.testing.assert_array_equal(batch.segments, [[0, 1, 1, 1, 1, 2, 2, 2, 2, 2], [0] * 7 + [1] * 3])
    np.testing.assert_array_equal(batch.loss_mask, [[0, 0, 0, 1, 1, 0, 0, 1, 1, 1], [0] * 9 + [1]])
    np.testing.assert_array_equal(batch.text_mask, batch.segments > 0)
    np.testing.assert_array_equal(packed.image_rows(np.array([1, 0])), [1, 0])
    with pytest.raises(ValueError, match="image 1's 2 texts take 9 tokens and do not fit length=8"):
        packed.collate(np.array([1]), 8, 0, VisionConfig())


def test_pack_by_image_rejects_images_without_texts():
    with pytest.raises(ValueError, match="1 images have no text"):
        pack_by_image(_encoded([([2, 10, 3], 1)], [1]))
