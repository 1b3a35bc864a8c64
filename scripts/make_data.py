#!/usr/bin/env python
"""Regenerate the shipped data: the tokenizer and random-weight default model in
data/tiny-llama/, and the sample prompts in data/sample.parquet.

    python scripts/make_data.py            # rewrite data/ in place
    python scripts/make_data.py --check    # build in a temporary dir, compare with data/
    python scripts/make_data.py --out DIR  # build into DIR instead

The shipped files are canonical; this script documents how they were made and reproduces them
exactly with the versions recorded below. Everything is deterministic:

* Tokenizer: byte-level BPE (GPT-2 pre-tokenization, 256 byte symbols, so any UTF-8 text
  encodes), 4096 tokens, trained with the `tokenizers` library on a corpus assembled from the
  docstrings of a fixed list of pure-Python standard-library modules (English prose plus code
  examples, ~650 KB). Docstrings change between Python releases, so the corpus is checked
  against CORPUS_SHA256 (made with CPython 3.11.7) and a warning says when another interpreter
  gives a different corpus, hence a different tokenizer. Training itself was checked to give
  an identical tokenizer.json across runs and thread counts (tokenizers 0.23.3).
* Special tokens: <|pad|>=0, <|bos|>=1, <|eos|>=2, <|im_start|>=3, <|im_end|>=4. Encoding
  prepends <|bos|>. The chat template is ChatML on these tokens, in tokenizer_config.json.
* Model: pdbatch.toymodels.build_llama(seed=0) with the TINY_LLAMA shapes (torch 2.13.0,
  transformers 5.24.0 for byte-identical files).
* Prompts: hand-written below, plus long ones (up to 300 tokens) assembled from PARAGRAPHS
  with a seeded random.Random; written with pyarrow (26.0.1).
"""

from __future__ import annotations

# Only the standard library at the top: `--print-corpus` runs this file in a bare interpreter.
import argparse
import filecmp
import hashlib
import importlib
import inspect
import json
import random
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_POSITIONS = 2048  # the model's max_position_embeddings, also the tokenizer's model_max_length

# --- Tokenizer ---------------------------------------------------------------------------------

VOCAB_SIZE = 4096
PAD, BOS, EOS, IM_START, IM_END = "<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]  # ids 0..4, in this order

# ChatML with the tokenizer's own tokens; starts with <|bos|> like a plain encoded prompt.
# add_generation_prompt appends the opening of the assistant's turn.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": BOS,
    "eos_token": EOS,
    "pad_token": PAD,
    "extra_special_tokens": [IM_START, IM_END],
    "model_max_length": MAX_POSITIONS,
    "clean_up_tokenization_spaces": False,
    "chat_template": CHAT_TEMPLATE,
}

# Pure-Python stdlib modules whose docstrings make the training corpus (no platform-specific
# or C-extension modules, so the text does not depend on the OS or build options).
CORPUS_MODULES = [
    "abc", "argparse", "ast", "base64", "bdb", "bisect", "calendar", "cmd", "code",
    "collections", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "dis", "doctest", "email.message", "email.utils", "enum", "fnmatch",
    "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "graphlib", "gzip", "heapq",
    "html.parser", "http.client", "http.cookiejar", "http.server", "imaplib", "inspect",
    "ipaddress", "json", "logging", "logging.handlers", "mailbox", "netrc", "numbers",
    "operator", "optparse", "pathlib", "pdb", "pickle", "pickletools", "poplib", "pprint",
    "profile", "pstats", "queue", "quopri", "random", "sched", "secrets", "shlex", "shutil",
    "smtplib", "statistics", "string", "tarfile", "tempfile", "textwrap", "threading", "timeit",
    "tokenize", "trace", "unittest", "unittest.mock", "urllib.parse", "urllib.request", "uuid",
    "warnings", "wave", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile",
]
CORPUS_SHA256 = "f65b19bc502adceec7e7741ad70b2d65f18976cc8787dce38756ef7a14991ce1"


def corpus_documents() -> list[str]:
    """Docstrings of each module, its public classes, functions and methods, in sorted order."""
    docs: list[str] = []
    seen: set[str] = set()

    def add(obj) -> None:
        doc = getattr(obj, "__doc__", None)
        if isinstance(doc, str) and doc.strip() and doc not in seen:
            seen.add(doc)
            docs.append(inspect.cleandoc(doc))

    for module_name in CORPUS_MODULES:
        module = importlib.import_module(module_name)
        add(module)
        for name in sorted(vars(module)):
            obj = vars(module)[name]
            if getattr(obj, "__module__", None) != module_name:
                continue  # imported from elsewhere
            if inspect.isclass(obj):
                add(obj)
                for member_name in sorted(vars(obj)):
                    member = vars(obj)[member_name]
                    if inspect.isfunction(member) or inspect.ismethoddescriptor(member):
                        add(member)
            elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
                add(obj)
    return docs


def corpus_in_bare_interpreter() -> list[str]:
    """corpus_documents() run by `python -I -S` (no site-packages, nothing imported but the
    standard library): libraries imported here (torch, transformers, ...) patch stdlib classes and
    functions, which would change the docstrings found."""
    cmd = [sys.executable, "-I", "-S", str(Path(__file__).resolve()), "--print-corpus"]
    out = subprocess.run(cmd, check=True, capture_output=True)
    return json.loads(out.stdout)  # ASCII: json.dumps escapes non-ASCII characters


def train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    docs = corpus_in_bare_interpreter()
    digest = hashlib.sha256("\n\n".join(docs).encode()).hexdigest()
    if digest != CORPUS_SHA256:
        warnings.warn(
            f"corpus sha256 {digest} differs from the one the shipped tokenizer was trained on "
            f"(Python {sys.version.split()[0]} here; made with 3.11.7): the tokenizer will differ",
            stacklevel=2,
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tokenizer.get_vocab_size() == VOCAB_SIZE
    return tokenizer


def write_tokenizer(model_dir: Path) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    train_tokenizer().save(str(model_dir / "tokenizer.json"), pretty=True)
    text = json.dumps(TOKENIZER_CONFIG, indent=2, ensure_ascii=False) + "\n"
    (model_dir / "tokenizer_config.json").write_text(text, encoding="utf-8")


MODEL_README = """\
# tiny-llama: the default model (random weights)

A Llama-style causal LM with **random weights**: its output text is noise. It exists so that
`pdbatch run` and the tests work with no download, on a CPU, in seconds, while exercising the
same code paths as a real model (rotary positions, grouped-query attention with 4 query heads
sharing 2 KV heads, tied embeddings, a real byte-level BPE tokenizer with a chat template).

- Shapes: hidden 128, 4 layers, 4 heads / 2 KV heads (head_dim 32), MLP 344, vocab 4096,
  max 2048 positions; 1.25M parameters, fp32.
- Tokenizer: byte-level BPE, 4096 tokens, trained on Python standard-library docstrings.
  `<|pad|>`=0, `<|bos|>`=1 (prepended when encoding), `<|eos|>`=2, `<|im_start|>`=3,
  `<|im_end|>`=4; ChatML chat template in `tokenizer_config.json`.
- Made by `scripts/make_data.py` with `pdbatch.toymodels.build_llama(seed=0)`; the weights are
  drawn with a larger scale than Hugging Face's default so greedy outputs vary with the prompt
  instead of repeating one token (see the comments in `pdbatch/toymodels.py`).
"""


def write_model(model_dir: Path) -> None:
    sys.path.insert(0, str(REPO))  # run from a checkout without installing
    from pdbatch.toymodels import TINY_LLAMA, build_llama

    assert TINY_LLAMA["max_position_embeddings"] == MAX_POSITIONS
    write_tokenizer(model_dir)
    build_llama(model_dir, seed=0, tokenizer_dir=model_dir, **TINY_LLAMA)
    (model_dir / "README.md").write_text(MODEL_README, encoding="utf-8")


# --- Sample prompts ----------------------------------------------------------------------------

SHORT_PROMPTS = [
    "Hello!",
    "What is the capital of France?",
    "Tell me a joke.",
    "Translate to German: good morning.",
    "Why is the sky blue?",
    "List three prime numbers.",
    "Write a haiku about autumn leaves.",
    "Explain recursion in one sentence.",
    "Qu'est-ce que la photosynthèse ?",
    "¿Dónde está la biblioteca más cercana?",
    "Schreibe ein kurzes Gedicht über den Frühling in Zürich.",
    "Você pode me ajudar com a lição de casa de matemática?",
    "東京でおすすめの観光地を三つ教えてください。",
    "请用一句话解释什么是机器学习。",
    "한국어로 자기소개를 해 주세요.",
    "Расскажи коротко об истории Москвы.",
    "Τι ώρα είναι τώρα στην Αθήνα;",
    "Summarize this in emoji: a cat naps in the sun 🐱☀️😴",
    "Rate this pizza 🍕 from 1 to 10 and explain ✨",
    "def fibonacci(n):",
    "SELECT name, COUNT(*) FROM orders GROUP BY name",
    "Convert 72 °F to °C and show the formula.",
    "Is 2^31 - 1 a prime number?",
    "Café, naïve, façade, jalapeño, smörgåsbord: spell each word backwards.",
]

MEDIUM_PROMPTS = [
    "You are a helpful assistant. A customer writes: \"My order #4512 arrived damaged and the box "
    "was wet.\" Write a short, polite reply that apologizes and offers a replacement.",
    "Write a Python function that reads a CSV file, skips the header row, and returns the sum "
    "of the values in the third column. Handle missing values by treating them as zero.",
    "Compare the advantages and disadvantages of trains and airplanes for a 600 km journey, "
    "considering cost, time, comfort and carbon emissions.",
    "Explain to a ten-year-old why the Moon has phases, using an analogy with a lamp and a ball.",
    "Draft an agenda for a one-hour team meeting about migrating our build system, with time "
    "slots and the owner of each item.",
    "Here is a list of groceries: apples, rice, olive oil, tofu, spinach, lemons, garlic. "
    "Suggest two dinner recipes that use most of them.",
    "Rewrite the following sentence in a formal register: \"hey, can u send me the report asap? "
    "thx\"",
    "Écris une courte lettre à un ami pour l'inviter à dîner samedi soir ; mentionne le menu : "
    "gratin dauphinois, crème brûlée et un verre de côtes-du-rhône.",
    "日本の四季について、それぞれの季節の特徴と代表的な行事を簡単に説明してください。",
    "请比较一下北京和上海在气候、饮食和交通方面的主要区别，并给出旅行建议。",
    "Given the JSON {\"user\": \"zoë\", \"age\": 31, \"tags\": [\"ski\", \"jazz\"]}, write a "
    "one-line description of the user in plain English.",
    "Plan a three-day trip to Lisbon 🇵🇹 for someone who loves food 🍷, history 🏰 and "
    "walking 🚶. Keep each day to four activities.",
    "A train leaves at 14:05 and arrives at 17:50, with a 25-minute stop on the way. How long "
    "was it moving? Show your reasoning step by step.",
    "What are the main differences between a process and a thread in an operating system? "
    "Give one example where each is the better choice.",
    "Write unit tests with pytest for a function slugify(text) that lowercases text, replaces "
    "spaces with hyphens and strips accents, so \"Crème Brûlée\" becomes \"creme-brulee\".",
    "Describe the water cycle in four steps, each in one sentence.",
]

# Material for the long prompts ("Summarize / answer questions about the following text").
PARAGRAPHS = [
    "The library opened in 1894 with a collection of three thousand books, most of them donated "
    "by local families. For decades it occupied two rooms above the post office, and the "
    "librarian lived in a small apartment at the back.",
    "In 1932 a fire destroyed nearly half of the collection. The town raised money for a new "
    "building within a year, and volunteers copied by hand the catalogue cards that had been "
    "lost.",
    "Modern processors execute instructions out of order and speculatively, predicting which "
    "way branches will go. When a prediction is wrong, the work done on the wrong path is "
    "discarded, which costs a few dozen cycles.",
    "Memory bandwidth, not arithmetic, limits many workloads: reading a large matrix once for "
    "every vector it multiplies leaves the arithmetic units idle most of the time. Batching "
    "several vectors together lets each byte read from memory serve more computations.",
    "The recipe calls for two cups of flour, one teaspoon of salt, a packet of dry yeast and "
    "warm water. The dough should rest for an hour, until it has doubled in size, before it is "
    "shaped and baked at a high temperature.",
    "Migratory birds navigate using the position of the sun, the patterns of the stars and the "
    "Earth's magnetic field. Young birds on their first journey often follow older ones, "
    "learning the route and the places to rest.",
    "The committee reviewed forty-two proposals this year. Eleven were funded in full, nine "
    "received partial funding, and the rest were returned with comments and an invitation to "
    "apply again next spring.",
    "Le village se trouve au pied des montagnes, à deux heures de la ville la plus proche. En "
    "hiver, la route est souvent fermée et les habitants dépendent du petit train qui passe deux "
    "fois par jour.",
    "Der Fluss trat im Frühjahr über die Ufer und überschwemmte die Felder. Die Bauern mussten "
    "ihre Aussaat um mehrere Wochen verschieben, doch die Ernte fiel am Ende überraschend gut "
    "aus.",
    "この町は江戸時代から続く宿場町で、古い木造の家並みが今も残っています。"
    "毎年秋には大きな祭りが開かれ、多くの観光客が訪れます。",
    "研究人员在实验中发现，适度的运动可以显著改善睡眠质量，并且这种效果在老年人中尤为明显。",
    "A good code review looks at more than style: it asks whether the change does what the "
    "description claims, whether it is tested, whether errors are handled, and whether the "
    "next person to read it will understand why it was written this way.",
    "During the storm the ferry stayed in port, and about two hundred passengers spent the "
    "night in the terminal. The crew handed out blankets and hot soup, and the first crossing "
    "left at six the next morning. ⛴️🌧️",
    "Spreadsheets are often the first database a team uses. They are flexible and visible to "
    "everyone, but as they grow, formulas break silently, copies diverge, and nobody is sure "
    "which version is the right one.",
]

LONG_TASKS = [
    "Summarize the following text in two sentences.",
    "Read the text below and list every number it mentions, with what it counts.",
    "Translate the following text into plain English, then give it a title.",
    "Write three questions a teacher could ask about this text.",
    "What is the tone of the following text? Quote one phrase that shows it.",
]

NUM_LONG = 64 - len(SHORT_PROMPTS) - len(MEDIUM_PROMPTS)  # 24
MAX_PROMPT_TOKENS = 300
SAMPLE_SEED = 1234


def sample_prompts(tokenizer_file: Path) -> list[str]:
    """All 64 prompts, shuffled. Long ones get a random token budget of 60-300 and take
    paragraphs in a random order while they fit (counted with the tiny-llama tokenizer)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    rng = random.Random(SAMPLE_SEED)
    long_prompts: list[str] = []
    while len(long_prompts) < NUM_LONG:
        budget = rng.randint(60, MAX_PROMPT_TOKENS)
        prompt = task = rng.choice(LONG_TASKS)
        for paragraph in rng.sample(PARAGRAPHS, len(PARAGRAPHS)):
            longer = f"{prompt}\n\n{paragraph}"
            if prompt != task and len(tokenizer.encode(longer).ids) > budget:
                break
            prompt = longer
        if prompt not in long_prompts:  # every prompt distinct
            long_prompts.append(prompt)
    prompts = SHORT_PROMPTS + MEDIUM_PROMPTS + long_prompts
    rng.shuffle(prompts)  # mix lengths, as real inputs do
    return prompts


def write_sample(path: Path, tokenizer_file: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = sample_prompts(tokenizer_file)
    table = pa.table(
        {
            "id": pa.array([f"sample-{i:03d}" for i in range(len(prompts))], pa.string()),
            "prompt": pa.array(prompts, pa.string()),
        }
    )
    pq.write_table(table, path)


# --- Main --------------------------------------------------------------------------------------


def make_all(data_dir: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    write_model(data_dir / "tiny-llama")
    write_sample(data_dir / "sample.parquet", data_dir / "tiny-llama" / "tokenizer.json")


def compare(built: Path, shipped: Path) -> list[str]:
    """Relative paths of files that differ between two data dirs (only those this script makes)."""
    names = ["sample.parquet"] + [
        f"tiny-llama/{p.name}" for p in sorted((built / "tiny-llama").iterdir())
    ]
    return [n for n in names if not (shipped / n).is_file()
            or not filecmp.cmp(built / n, shipped / n, shallow=False)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "data", help="data dir to write")
    parser.add_argument("--check", action="store_true",
                        help="build into a temporary dir and compare with --out byte for byte")
    parser.add_argument("--print-corpus", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.print_corpus:
        sys.stdout.write(json.dumps(corpus_documents()))
        return 0
    if not args.check:
        make_all(args.out)
        print(f"wrote {args.out}/tiny-llama and {args.out}/sample.parquet")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        make_all(Path(tmp))
        differing = compare(Path(tmp), args.out)
    for name in differing:
        print(f"differs: {name}")
    print("identical" if not differing else f"{len(differing)} file(s) differ")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
