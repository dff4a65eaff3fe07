#!/usr/bin/env python3
"""Convert a CTranslate2 Whisper model (faster-whisper's `model.bin`) to the Hugging Face layout of
transformers' `WhisperForConditionalGeneration`, standard library only:

    python3 scripts/convert_ct2_whisper.py MODEL.bin CT2_CONFIG.json TOKENIZER.json OUT_DIR

Writes OUT_DIR/{model.safetensors, config.json, generation_config.json, preprocessor_config.json,
tokenizer.json}. The weights keep their stored type (float16 for faster-whisper's models).

CTranslate2's `model.bin` (binary version 6, `ctranslate2/specs/model_spec.py`): the spec name and
revision, then each variable as name, rank, dims (u32), type id (float32, int8, int16, int32, float16,
bfloat16), byte count and bytes, then aliases. Its Whisper converter fused each self-attention's
q/k/v projections (`linear_0`, k with a zero bias: Whisper's k_proj has none) and each cross-attention's
k/v (`linear_1`), and calls LayerNorm weights gamma/beta; this undoes both.
"""
import json
import os
import struct
import sys

DTYPES = {0: ("F32", 4), 1: ("I8", 1), 2: ("I16", 2), 3: ("I32", 4), 4: ("F16", 2), 5: ("BF16", 2)}


def read_ct2(path):
    with open(path, "rb") as f:
        data = f.read()
    pos = 0

    def take(fmt):
        nonlocal pos
        value = struct.unpack_from("<" + fmt, data, pos)[0]
        pos += struct.calcsize("<" + fmt)
        return value

    def string():
        nonlocal pos
        n = take("H")
        s = data[pos:pos + n - 1].decode()
        pos += n
        return s

    version = take("I")
    if version != 6:
        sys.exit(f"{path}: CTranslate2 binary version {version}, expected 6")
    spec = string()
    if spec != "WhisperSpec":
        sys.exit(f"{path}: a {spec}, not a WhisperSpec")
    take("I")  # revision
    variables = {}
    for _ in range(take("I")):
        name = string()
        dims = [take("I") for _ in range(take("B"))]
        dtype = take("B")
        size = take("I")
        if dtype not in DTYPES or pos + size > len(data):
            sys.exit(f"{path}: variable {name} is truncated or of unknown type {dtype}")
        variables[name] = (dims, DTYPES[dtype][0], data[pos:pos + size])
        pos += size
    for _ in range(take("I")):
        alias, target = string(), string()
        variables.setdefault(alias, variables[target])
    return variables


def scalar(variables, name):
    dims, dtype, raw = variables[name]
    fmt = {"I8": "b", "I16": "h", "I32": "i", "F32": "f"}[dtype]
    return struct.unpack("<" + fmt, raw)[0]


class Writer:
    def __init__(self):
        self.tensors = []

    def add(self, name, dims, dtype, raw):
        count = 1
        for d in dims:
            count *= d
        width = {"F32": 4, "F16": 2, "BF16": 2}[dtype]
        assert len(raw) == count * width, name
        self.tensors.append((name, dims, dtype, raw))

    def rows(self, name, variable, start, count):
        """Rows start..start+count of a 1-D or 2-D variable."""
        dims, dtype, raw = variable
        width = {"F32": 4, "F16": 2, "BF16": 2}[dtype]
        row = (dims[1] if len(dims) == 2 else 1) * width
        part = raw[start * row:(start + count) * row]
        self.add(name, [count] + dims[1:], dtype, part)

    def write(self, path):
        header, offset = {}, 0
        for name, dims, dtype, raw in self.tensors:
            header[name] = {"dtype": dtype, "shape": dims, "data_offsets": [offset, offset + len(raw)]}
            offset += len(raw)
        header["__metadata__"] = {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        tmp = path + ".part"
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for _, _, _, raw in self.tensors:
                f.write(raw)
        os.replace(tmp, path)


def convert(model_bin, ct2_config, tokenizer_json, out):
    v = read_ct2(model_bin)
    with open(ct2_config) as f:
        cfg = json.load(f)
    with open(tokenizer_json) as f:
        tok = json.load(f)
    d_model = v["encoder/conv1/weight"][0][0]
    mels = v["encoder/conv1/weight"][0][1]
    vocab = v["decoder/embeddings/weight"][0][0]
    ffn = v["encoder/layer_0/ffn/linear_0/weight"][0][0]
    enc_layers = sum(1 for n in v if n.startswith("encoder/layer_") and n.endswith("ffn/linear_0/weight"))
    dec_layers = sum(1 for n in v if n.startswith("decoder/layer_") and n.endswith("ffn/linear_0/weight"))
    heads_enc, heads_dec = scalar(v, "encoder/num_heads"), scalar(v, "decoder/num_heads")
    if "decoder/scale_embeddings" in v and scalar(v, "decoder/scale_embeddings") not in (0, 1):
        sys.exit("scaled embeddings are not Whisper's")

    w = Writer()

    def copy(src, dst):
        w.add(dst, *v[src])

    def norm(src, dst):
        copy(src + "/gamma", dst + ".weight")
        copy(src + "/beta", dst + ".bias")

    def linear(src, dst, rows=None, bias=True):
        start, count = rows if rows else (0, v[src + "/weight"][0][0])
        w.rows(dst + ".weight", v[src + "/weight"], start, count)
        if bias:
            w.rows(dst + ".bias", v[src + "/bias"], start, count)

    def self_attention(src, dst):
        for i, p in enumerate(("q_proj", "k_proj", "v_proj")):
            linear(src + "/linear_0", f"{dst}.{p}", (i * d_model, d_model), bias=p != "k_proj")
        linear(src + "/linear_1", dst + ".out_proj")

    def ffn_block(src, dst):
        norm(src + "/layer_norm", dst + ".final_layer_norm")
        linear(src + "/linear_0", dst + ".fc1")
        linear(src + "/linear_1", dst + ".fc2")

    e = "model.encoder"
    for c in ("conv1", "conv2"):
        copy(f"encoder/{c}/weight", f"{e}.{c}.weight")
        copy(f"encoder/{c}/bias", f"{e}.{c}.bias")
    copy("encoder/position_encodings/encodings", f"{e}.embed_positions.weight")
    for i in range(enc_layers):
        src, dst = f"encoder/layer_{i}", f"{e}.layers.{i}"
        norm(src + "/self_attention/layer_norm", dst + ".self_attn_layer_norm")
        self_attention(src + "/self_attention", dst + ".self_attn")
        ffn_block(src + "/ffn", dst)
    norm("encoder/layer_norm", f"{e}.layer_norm")

    d = "model.decoder"
    copy("decoder/embeddings/weight", f"{d}.embed_tokens.weight")
    copy("decoder/position_encodings/encodings", f"{d}.embed_positions.weight")
    for i in range(dec_layers):
        src, dst = f"decoder/layer_{i}", f"{d}.layers.{i}"
        norm(src + "/self_attention/layer_norm", dst + ".self_attn_layer_norm")
        self_attention(src + "/self_attention", dst + ".self_attn")
        norm(src + "/attention/layer_norm", dst + ".encoder_attn_layer_norm")
        linear(src + "/attention/linear_0", dst + ".encoder_attn.q_proj")
        linear(src + "/attention/linear_1", dst + ".encoder_attn.k_proj", (0, d_model), bias=False)
        linear(src + "/attention/linear_1", dst + ".encoder_attn.v_proj", (d_model, d_model))
        linear(src + "/attention/linear_2", dst + ".encoder_attn.out_proj")
        ffn_block(src + "/ffn", dst)
    norm("decoder/layer_norm", f"{d}.layer_norm")
    # The k bias CTranslate2 added must be the zeros it wrote.
    for i in range(enc_layers):
        raw = v[f"encoder/layer_{i}/self_attention/linear_0/bias"][2]
        width = len(raw) // (3 * d_model)
        if any(raw[d_model * width:2 * d_model * width]):
            sys.exit(f"encoder layer {i}: a k_proj bias that is not zero")

    os.makedirs(out, exist_ok=True)
    added = {t["content"]: t["id"] for t in tok["added_tokens"]}
    lang_to_id = {t: i for t, i in added.items() if i in set(cfg["lang_ids"])}
    sot = added["<|startoftranscript|>"]
    eot = added["<|endoftext|>"]
    config = {
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        "activation_function": "gelu",
        "d_model": d_model,
        "encoder_layers": enc_layers,
        "decoder_layers": dec_layers,
        "encoder_attention_heads": heads_enc,
        "decoder_attention_heads": heads_dec,
        "encoder_ffn_dim": ffn,
        "decoder_ffn_dim": ffn,
        "num_mel_bins": mels,
        "vocab_size": vocab,
        "max_source_positions": v["encoder/position_encodings/encodings"][0][0],
        "max_target_positions": v["decoder/position_encodings/encodings"][0][0],
        "scale_embedding": False,
        "tie_word_embeddings": True,
        "pad_token_id": eot,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "decoder_start_token_id": sot,
        "torch_dtype": "float16",
    }
    generation = {
        "alignment_heads": cfg["alignment_heads"],
        "begin_suppress_tokens": cfg["suppress_ids_begin"],
        "suppress_tokens": cfg["suppress_ids"],
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "decoder_start_token_id": sot,
        "is_multilingual": len(lang_to_id) > 1,
        "lang_to_id": lang_to_id,
        "task_to_id": {"transcribe": added["<|transcribe|>"], "translate": added["<|translate|>"]},
        "no_timestamps_token_id": added["<|notimestamps|>"],
        "prev_sot_token_id": added["<|startofprev|>"],
        "max_initial_timestamp_index": 50,
        "max_length": config["max_target_positions"],
        "return_timestamps": False,
    }
    preprocessor = {
        "feature_extractor_type": "WhisperFeatureExtractor",
        "processor_class": "WhisperProcessor",
        "chunk_length": 30,
        "feature_size": mels,
        "hop_length": 160,
        "n_fft": 400,
        "n_samples": 480000,
        "nb_max_frames": 3000,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": False,
        "sampling_rate": 16000,
    }
    for name, obj in (("config.json", config), ("generation_config.json", generation),
                      ("preprocessor_config.json", preprocessor)):
        with open(os.path.join(out, name), "w") as f:
            json.dump(obj, f, indent=2)
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        json.dump(tok, f, ensure_ascii=False)
    w.write(os.path.join(out, "model.safetensors"))


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    convert(*sys.argv[1:])
