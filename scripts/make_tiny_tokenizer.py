#!/usr/bin/env python3
"""Give the tiny random-weight Idefics3 (models/tiny-idefics3) the files it needs to run on its own:
a tokenizer, a chat template and the image-processor settings, so that

    edgevlm run --model models/tiny-idefics3 --image tests/fixtures/images/small.png --prompt Hi

works on a fresh clone, offline, without ../shared. Its answer is noise (random weights): the model
exercises the whole pipeline, not language.

The tokenizer is our own, not SmolVLM's: a byte-level BPE trained with `tokenizers` on the text of
this Python's standard library (its documentation topics and sources), to the 49,152 base tokens the
tiny model's embedding expects, with SmolVLM's 128 added special tokens (names and ids read from
../shared, where the real files live) at the same ids, so `<image>` is config.json's image_token_id.
The chat template is written here in SmolVLM's prompt format. transformers' `Idefics3Processor`
writes the files; the script then reloads them with transformers and writes a golden of a rendered
and tokenized conversation (`tests/fixtures/golden/tiny_tokenizer.json`) that the Rust tests compare
ids against.

Run:  scripts/setup-python.sh && ~/.cache/edgevlm/venv/bin/python scripts/make_tiny_tokenizer.py
"""
import json
import sysconfig
from pathlib import Path

import pydoc_data.topics
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoProcessor, Idefics3Processor, PreTrainedTokenizerFast
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "models" / "smolvlm-256m-instruct"
MODEL_DIR = ROOT / "models" / "tiny-idefics3"
GOLDEN = ROOT / "tests" / "fixtures" / "golden" / "tiny_tokenizer.json"
BASE_VOCAB = 49152

# SmolVLM's prompt format (User/Assistant turns, `<end_of_utterance>`), written for this model.
CHAT_TEMPLATE = (
    "<|im_start|>"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{{ ':' if message['content'][0]['type'] == 'image' else ': ' }}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% elif part['type'] == 'image' %}<image>{% endif %}"
    "{% endfor %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def corpus():
    """This Python's documentation topics and standard-library sources (tests and IDLE left out)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in lib.rglob("*.py")
        if not {"test", "tests", "site-packages", "idlelib"} & set(p.parts)
    )
    yield "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    for f in files:
        yield f.read_text(encoding="utf-8", errors="replace")


def train_base():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BASE_VOCAB,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    if tok.get_vocab_size() != BASE_VOCAB:
        raise SystemExit(f"trained {tok.get_vocab_size()} tokens, need {BASE_VOCAB}: the corpus is too small")
    return tok


def main():
    config = json.loads((MODEL_DIR / "config.json").read_text())
    added = json.loads((SHARED / "added_tokens.json").read_text())
    specials = [name for name, _ in sorted(added.items(), key=lambda kv: kv[1])]
    ids = sorted(added.values())
    if ids != list(range(BASE_VOCAB, BASE_VOCAB + len(ids))):
        raise SystemExit("SmolVLM's added tokens are not contiguous after the base vocabulary")

    base = train_base()
    # In id order, so each lands on SmolVLM's id.
    base.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=base,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<fake_token_around_image>", "<image>", "<end_of_utterance>"],
        model_max_length=config["text_config"]["max_position_embeddings"],
    )
    for name, want in added.items():
        got = fast.convert_tokens_to_ids(name)
        if got != want:
            raise SystemExit(f"{name} became id {got}, SmolVLM has {want}")
    if fast.convert_tokens_to_ids("<image>") != config["image_token_id"]:
        raise SystemExit("<image> is not config.json's image_token_id")

    tile = config["vision_config"]["image_size"]
    image_processor = Idefics3ImageProcessorPil(
        do_resize=True,
        size={"longest_edge": 4 * tile},
        max_image_size={"longest_edge": tile},
        resample=1,  # LANCZOS, as SmolVLM
        do_image_splitting=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    patches = (tile // config["vision_config"]["patch_size"]) ** 2
    seq_len = patches // config["scale_factor"] ** 2
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=fast,
        chat_template=CHAT_TEMPLATE,
        image_seq_len=seq_len,
    )
    processor.save_pretrained(MODEL_DIR)
    # Compact JSON: the same tokenizer in a third of the bytes.
    tok_path = MODEL_DIR / "tokenizer.json"
    tok_path.write_text(Tokenizer.from_file(str(tok_path)).to_str(pretty=False))

    # Golden: transformers' own reload of what was written, on a conversation with an image.
    reloaded = AutoProcessor.from_pretrained(MODEL_DIR)
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Answer in one word."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is 42 in it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
        {"role": "user", "content": [{"type": "text", "text": "And the border?"}]},
    ]
    prompt = reloaded.apply_chat_template(messages, add_generation_prompt=True)
    ids = reloaded.tokenizer(prompt)["input_ids"]
    GOLDEN.write_text(json.dumps({
        "messages": messages,
        "prompt": prompt,
        "input_ids": ids,
        "decoded_sample": {str(i): reloaded.tokenizer.decode([i]) for i in [0, 1, 300, 4000, 40000, 49190, 49279]},
    }, indent=1) + "\n")
    print(f"wrote {MODEL_DIR} tokenizer, template and processor files; {GOLDEN}")


if __name__ == "__main__":
    main()
