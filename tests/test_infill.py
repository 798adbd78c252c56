"""Fill-in-the-middle: the infilling prompt of both layouts against hand-checked token ids
(CodeLlama's as Meta's reference lays it out: the suffix without the leading space that
transformers' CodeLlamaTokenizer puts in front of it), a random model with CodeLlama's tokens
filling a gap as transformers does from the same ids, through the library and the openai client,
and the refusals."""

from __future__ import annotations

import dataclasses
import json

import openai
import pytest
import sentencepiece as spm
import tokenizers
import torch
import transformers

from codellama_jax import generate, infill, load, stream
from codellama_jax.config import LlamaConfig
from codellama_jax.convert.gguf import GGUFCheckpoint
from codellama_jax.errors import RequestError
from codellama_jax.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer

from conftest import KEY, NAME, running_server, write_hf_checkpoint

FIM = {"▁<PRE>": 400, "▁<SUF>": 401, "▁<MID>": 402, "▁<EOT>": 403}  # after the test vocabulary's 400 pieces
PREFIX, SUFFIX = "def add(a, b):\n    ", "\n    return c\n"


@pytest.fixture(scope="module")
def fim_dir(tmp_path_factory, sp_dir):
    """A random model whose SentencePiece tokenizer has CodeLlama's four infilling tokens."""
    directory = write_hf_checkpoint(tmp_path_factory.mktemp("fim") / "ckpt", sp_dir, vocab_size=404)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"].update({str(i): {"content": t, "special": True} for t, i in FIM.items()})
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def model(fim_dir):
    return load(fim_dir, dtype="float32")


def test_codellama_layout_is_metas(fim_dir):
    sp = spm.SentencePieceProcessor(model_file=str(fim_dir / "tokenizer.model"))
    prefix = ["▁d", "ef", "▁a", "d", "d", "(", "a", ",", "▁", "b", "):\n", "▁▁▁▁"]  # the dummy-prefix space first
    suffix = ["\n", "▁▁▁▁", "return", "▁c", "\n"]  # none: Meta's encode_infilling
    want = [1, FIM["▁<PRE>"], *map(sp.piece_to_id, prefix), FIM["▁<SUF>"], *map(sp.piece_to_id, suffix), FIM["▁<MID>"]]
    tokenizer = load_tokenizer(fim_dir)
    got = infill.prompt_ids(tokenizer, LlamaConfig.from_hf(fim_dir), PREFIX, SUFFIX)
    assert got == want
    assert infill.layout(tokenizer).end_id == FIM["▁<EOT>"]
    # transformers' CodeLlamaTokenizer: the same but for a lone "▁" in front of the suffix
    (fim_dir / "ref").mkdir(exist_ok=True)
    (fim_dir / "ref" / "tokenizer.model").write_bytes((fim_dir / "tokenizer.model").read_bytes())
    (fim_dir / "ref" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CodeLlamaTokenizer"}))
    reference = transformers.AutoTokenizer.from_pretrained(fim_dir / "ref")
    theirs = reference.convert_ids_to_tokens(reference(PREFIX, suffix=SUFFIX)["input_ids"])
    ours = [next((t for t, i in FIM.items() if i == token), None) or sp.id_to_piece(token) for token in got]
    at = ours.index("▁<SUF>") + 1
    assert theirs == [*ours[:at], "▁", *ours[at:]]
    # the same vocabulary as a tokenizer.json (Metaspace): the suffix without its leading space still
    reference.save_pretrained(fim_dir / "json")
    as_json = HFTokenizer.from_directory(fim_dir / "json")
    for text in (SUFFIX, " x", "", "☺ y"):
        assert as_json.encode_continuation(text) == tokenizer.encode_continuation(text), text


def test_infilling_pieces_inside_a_sentencepiece_model_are_control_tokens(tmp_path):
    """As in CodeLlama's own tokenizer.model (and GGUF files typing them as ordinary pieces): found
    in the vocabulary, never made from text, and the end token stops every request."""
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["def f(x):\n    return x\n"] * 50),
                                   model_prefix=str(tmp_path / "sp"), model_type="bpe", vocab_size=290,
                                   user_defined_symbols=list(infill.CODELLAMA), byte_fallback=True, minloglevel=2)  # fmt: skip
    tokenizer = SentencePieceTokenizer((tmp_path / "sp.model").read_bytes())
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    found = infill.layout(tokenizer)
    assert (found.prefix_id, found.end_id) == (sp.piece_to_id("▁<PRE>"), sp.piece_to_id("▁<EOT>"))
    assert not set(tokenizer.encode("x = ' <PRE>' <EOT>")) & {found.prefix_id, found.end_id}  # text stays text
    assert infill.end_ids(tokenizer) == (found.end_id,)


def test_starcoder_layout_on_the_demo_tokenizer(smollm2_gguf):
    demo = GGUFCheckpoint(smollm2_gguf)
    raw = tokenizers.Tokenizer.from_str(demo.tokenizer().tok.to_str())
    raw.add_special_tokens(["<fim_prefix>", "<fim_suffix>", "<fim_middle>"])  # ids 49152, 49153, 49154
    tokenizer = HFTokenizer(raw, eos_token="<|im_end|>")
    found = infill.layout(tokenizer)
    assert (found.name, found.end_id) == ("starcoder", 0)  # the middle ends at <|endoftext|>
    plain = raw.encode(PREFIX, add_special_tokens=False).ids, raw.encode(SUFFIX, add_special_tokens=False).ids
    grown = dataclasses.replace(demo.config, vocab_size=49155)  # a model with the three tokens' embeddings
    assert infill.prompt_ids(tokenizer, grown, PREFIX, SUFFIX) == [49152, *plain[0], 49153, *plain[1], 49154]
    with pytest.raises(RequestError, match="past the model's 49152-token vocabulary"):
        infill.prompt_ids(tokenizer, demo.config, PREFIX, SUFFIX)
    with pytest.raises(RequestError, match="has none") as e:  # the demo model itself has no infilling tokens
        infill.prompt_ids(demo.tokenizer(), demo.config, PREFIX, SUFFIX)
    assert e.value.param == "suffix"


def test_only_codellama_7b_and_13b_were_trained_to_infill(model):
    assert [infill.trained_to_infill(LlamaConfig.preset(f"codellama-{size}-instruct")) for size in ("7b", "13b", "34b", "70b")
            ] == [True, True, False, False]  # fmt: skip
    with pytest.raises(RequestError, match="not 34B and 70B") as e:
        infill.prompt_ids(model.tokenizer, LlamaConfig.preset("codellama-70b-instruct"), PREFIX, SUFFIX)
    assert e.value.param == "suffix"


def test_the_middle_is_transformers_greedy_one_and_ends_at_eot(model, fim_dir):
    ids = infill.prompt_ids(model.tokenizer, model.config, PREFIX, SUFFIX)
    reference = transformers.LlamaForCausalLM.from_pretrained(fim_dir).eval()
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                                 eos_token_id=[2, FIM["▁<EOT>"]], pad_token_id=2)[0, len(ids):].tolist()  # fmt: skip
    want = out[: next((i for i, t in enumerate(out) if t in (2, FIM["▁<EOT>"])), len(out))]
    got = generate(model, [PREFIX], suffix=SUFFIX, temperature=0.0, max_tokens=10)[0]
    assert want and got.token_ids == want and got.prompt_tokens == len(ids)
    closed = generate(model, [PREFIX], suffix=SUFFIX, temperature=0.0, max_tokens=10, logit_bias={FIM["▁<EOT>"]: 100})[0]
    assert (closed.text, closed.finish_reason) == ("", "stop")
    assert "".join(stream(model, PREFIX, suffix=SUFFIX, temperature=0.0, max_tokens=10)) == got.text
    with pytest.raises(RequestError, match="must be text") as e:
        generate(model, [[1, 5, 6]], suffix=SUFFIX)
    assert e.value.param == "prompt"


def test_completions_with_suffix_through_the_openai_client(model, tiny_gqa_tied):
    want = generate(model, [PREFIX], suffix=SUFFIX, temperature=0.0, max_tokens=10)[0]
    with running_server(model) as (url, _, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        kwargs = dict(model=NAME, prompt=PREFIX, suffix=SUFFIX, temperature=0.0, max_tokens=10)
        reply = client.completions.create(**kwargs)
        assert reply.choices[0].text == want.text and reply.usage.prompt_tokens == want.prompt_tokens
        streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices)
        assert streamed == want.text
        closed = client.completions.create(**kwargs, logit_bias={str(FIM["▁<EOT>"]): 100})
        assert (closed.choices[0].text, closed.choices[0].finish_reason) == ("", "stop")
        at_the_start = client.completions.create(**{**kwargs, "prompt": ""})  # the gap at the file's start
        assert at_the_start.choices[0].text == generate(model, [""], suffix=SUFFIX, temperature=0.0, max_tokens=10)[0].text
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**{**kwargs, "prompt": [1, 5, 6]})
        assert e.value.body["param"] == "prompt"
    with running_server(load(tiny_gqa_tied, dtype="float32")) as (url, _, _):  # a tokenizer without infilling tokens
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**kwargs)
        assert e.value.body["param"] == "suffix" and "infilling tokens" in e.value.body["message"]
