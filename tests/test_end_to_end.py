"""Messages + pictures -> our Processor -> our model, against transformers on the same batch."""

import numpy as np
from hf_reference import build_hf_model, hf_logits, rel_err
from PIL import Image
from tiny_tokenizer import make_tiny_tokenizer, write_preprocessor_config

from qwenvl_jax import Processor, get_rope_index, load_pretrained


def _picture(rng, w, h):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_chat_with_images_and_video(tmp_path):
    ids = make_tiny_tokenizer(tmp_path)
    write_preprocessor_config(tmp_path, min_pixels=3136, max_pixels=60_000)
    tokens = {k: ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                  "vision_end_token_id")}
    hf = build_hf_model("untied_w112", tokens=tokens)
    hf.save_pretrained(tmp_path)
    processor = Processor.from_pretrained(tmp_path)
    model = load_pretrained(tmp_path, dtype="float32")

    rng = np.random.default_rng(0)
    pics = [_picture(rng, 300, 200), _picture(rng, 90, 160)]
    frames = [_picture(rng, 140, 112) for _ in range(5)]
    chat0 = [{"role": "user", "content": [{"type": "image"}, {"type": "video"},
                                          {"type": "text", "text": "What happens after this picture?"}]}]
    chat1 = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    prompts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in (chat0, chat1)]
    batch = processor(text=prompts, images=pics, videos=[frames], fps=1.6)

    # 200x300 -> 196x308 exceeds 60000 px -> floor(200/28)*28 x floor(300/28)*28 = 196x280;
    # 160x90 -> round(160/28)*28 x round(90/28)*28 = 168x84 (SPEC 1.1)
    assert batch["image_grid_thw"].tolist() == [[1, 14, 20], [1, 12, 6]]
    assert batch["video_grid_thw"].tolist() == [[3, 8, 10]]  # 5 frames padded to 6, 2 per slice
    np.testing.assert_allclose(batch["second_per_grid_ts"], [1.25])
    assert (batch["attention_mask"][1, 0] == 0) and (batch["attention_mask"][0] == 1).all()  # left padding

    # Training-rule positions, given to HF explicitly because the batch holds a video (SPEC 6).
    pos, _ = get_rope_index(batch["input_ids"], image_token_id=tokens["image_token_id"],
                            video_token_id=tokens["video_token_id"], image_grid_thw=batch["image_grid_thw"],
                            video_grid_thw=batch["video_grid_thw"],
                            second_per_grid_ts=batch["second_per_grid_ts"], attention_mask=batch["attention_mask"])
    ref = hf_logits(hf, **batch, position_ids=pos.astype(np.int64))
    assert rel_err(model(**batch), ref, batch["attention_mask"]) <= 1e-4
