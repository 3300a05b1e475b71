"""Vision-language models: a frozen image encoder, a projector, and our decoder joined at its input embeddings.

    vit.py           CLIP/SigLIP-style ViT (transformers' names, equal hidden states)
    efficientnet.py  EfficientNet-Lite0, the pretrained encoder shipped on PyPI (converted to safetensors once)
    projector.py     mlp2x_gelu, linear, pixel_shuffle
    vlm.py           VisionLanguageModel: images -> embeddings spliced over the placeholders, checked spans
    adapter.py       the multimodal LLaMA-Adapter (the image as a condition on the adaption prompts)
    images.py        decoding untrusted images with limits; CLIP/SigLIP preprocessing
    llava.py         Hugging Face LlavaForConditionalGeneration directories (read and write, with the processor)
    checkpoint.py    building from parts (build_vlm) and our directory layout (save_vlm / load_vlm)
    generate.py      prompts with images -> the one decode loop
    data.py          synthetic scenes, Fashion-MNIST, the two-stage training sets, cached features

Imports flow into this package from model, adapters, checkpoint and generate, never the other way.
"""
