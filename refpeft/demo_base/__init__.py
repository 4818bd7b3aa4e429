"""The demo's tiny pretrained base model, shipped as package data, and the script that makes it.

    world.py               the procedural world (made-up objects, their facts) and every dialogue about them
    build.py               `python -m refpeft.demo_base.build`: world -> corpus -> tokenizer -> a Llama
                           pretrained with refpeft's full fine-tuning -> the files below
    config.json, model.safetensors, tokenizer.json, tokenizer_config.json
                           a Hugging Face model folder (refpeft.model.load and transformers both read it)
    world.json             the objects and facts the model learned, and the build's record

`refpeft demo` (refpeft.demo_model) fine-tunes a LoRA adapter on it.
"""
