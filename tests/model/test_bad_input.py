"""Bad batches fail on the host with one clear message, before anything is compiled."""

import numpy as np
import pytest

from qwenvl_jax.pretrained import load_pretrained


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_pretrained(tiny_checkpoint("untied_w112")[0], dtype="float32")


def _pixels(n):
    return np.zeros((n, 1176), np.float32)


@pytest.mark.parametrize("kwargs,message", [
    (dict(input_ids=np.array([[1, 500, 500, 2]]), pixel_values=_pixels(64), image_grid_thw=[[1, 8, 8]]),
     r"input_ids hold 2 image placeholder tokens \(id 500\) but the image grids \[\[1, 8, 8\]\] give 16"),
    (dict(input_ids=np.array([[1, 500, 2]])),
     r"input_ids hold 1 image placeholder tokens \(id 500\) but the image grids \[\] give 0"),
    (dict(input_ids=np.array([[1, 501, 2]]), pixel_values_videos=_pixels(16), video_grid_thw=[[1, 4, 4]],
          second_per_grid_ts=[1.0, 2.0]),
     r"input_ids hold 1 video placeholder tokens"),
    (dict(input_ids=np.array([[1] + [500] * 4 + [2]]), pixel_values=_pixels(15), image_grid_thw=[[1, 4, 4]]),
     r"pixel values have shape \(15, 1176\) but the grids \[\[1, 4, 4\]\] need \(16, 1176\)"),
    (dict(input_ids=np.array([[1, 512, 2]])), r"token id 512 outside the vocabulary \[0, 512\)"),
    (dict(input_ids=np.array([1, 2, 3])), r"input_ids must have 2 dimensions"),
    (dict(input_ids=np.array([[1, 2]]), attention_mask=np.ones((1, 3))), r"attention_mask shape"),
    (dict(input_ids=np.array([[1, 2]]), image_grid_thw=[[1, 4, 4]]),
     r"image: pixel values and grid_thw must be given together"),
])
def test_bad_batch(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model(**kwargs)
