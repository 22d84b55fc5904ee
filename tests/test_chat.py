"""Chat fine-tuning: conversations prepared with the chat template and a loss mask on the assistant's replies
(data=chat), supervised fine-tuning of a pretrained checkpoint on them (experiment=sft), and a conversation
with the result over a pipe (sample.py chat=true). The conversations come from tiny Shakespeare's dialogue:
one speaker's speech as the user's message, the next speaker's reply as the assistant's."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hydragpt.data.chat import ChatTemplate
from hydragpt.data.chat import conversation as turns
from hydragpt.data.chat_batches import IGNORE, ChatBatchLoader
from hydragpt.data.tokenizer import BpeTokenizer, TiktokenTokenizer
from hydragpt.model import GPT, GPTConfig
from hydragpt.sampling import load_model
from tests.helpers import DEBUG_RUN, REPO, SHAKESPEARE, hf_gpt2, open_prepared, run_script, torchrun

MODEL = ("model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64")
MAX_CONVERSATION_TOKENS = 48  # two of the play's turns often exceed it: their conversation is cut between them


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker, speech) for each speech of the play, its lines joined by spaces."""
    found = []
    for block in text.split("\n\n"):
        lines = block.strip().split("\n")
        if len(lines) > 1 and re.fullmatch(r"[A-Za-z' ]+:", lines[0]):
            found.append((lines[0][:-1], " ".join(lines[1:])))
    return found


def exchanges(text: str) -> list[tuple[str, str]]:
    """A speech and the short reply another speaker gives it: easy replies to learn, and to learn to end."""
    said = speeches(text)
    return [
        (speech, reply)
        for (speaker, speech), (other, reply) in itertools.pairwise(said)
        if speaker != other and len(speech) <= 120 and len(reply) <= 40
    ]


def messages(conversation: list[tuple[str, str]], system: str | None = None) -> list[dict[str, str]]:
    first = [{"role": "system", "content": system}] if system else []
    return first + [
        {"role": role, "content": content}
        for turn in conversation
        for role, content in zip(("user", "assistant"), turn, strict=True)
    ]


@pytest.fixture(scope="module")
def play(corpus_file: Path) -> str:
    if corpus_file != SHAKESPEARE:
        pytest.skip("needs tiny Shakespeare's dialogue (../shared/data/tinyshakespeare)")
    return corpus_file.read_text()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chat")


@pytest.fixture(scope="module")
def tokenizer_file(play: str, corpus_file: Path, workdir: Path) -> Path:
    """A 1K byte-level BPE of the play, with the chat tokens."""
    trained = run_script(
        "train_tokenizer", "data=text", f"data.source={corpus_file}", f"paths.data_dir={workdir}", "vocab_size=1024"
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    return Path(json.loads(trained.stdout.strip().splitlines()[-1])["tokenizer"])


@pytest.fixture(scope="module")
def dialogue(play: str, workdir: Path) -> Path:
    """Conversations of two exchanges each, as jsonl; the first opens with a system message."""
    pairs = exchanges(play)
    path = workdir / "dialogue.jsonl"
    with open(path, "w") as f:
        for i in range(0, min(len(pairs), 800) - 1, 2):
            system = "You are a citizen of Rome." if i == 0 else None
            f.write(json.dumps({"messages": messages(pairs[i : i + 2], system)}) + "\n")
    return path


def chat_data(dialogue: Path, tokenizer_file: Path, workdir: Path, name: str = "dialogue") -> tuple[str, ...]:
    return (
        "data=chat",
        f"data.name={name}",
        f"data.source={dialogue}",
        f"data.tokenizer={tokenizer_file}",
        f"data.max_conversation_tokens={MAX_CONVERSATION_TOKENS}",
        f"paths.data_dir={workdir}",
    )


def fine_tuning(pretrained: Path, dialogue: Path, tokenizer_file: Path, workdir: Path) -> tuple[str, ...]:
    """train.py's overrides for experiment=sft from the pretrained run, on the dialogue, on the CPU."""
    return (
        "experiment=sft",
        *chat_data(dialogue, tokenizer_file, workdir),
        "system=cpu",
        f"train.init_from={pretrained}",
    )


@pytest.fixture(scope="module")
def prepared(dialogue: Path, tokenizer_file: Path, workdir: Path) -> Path:
    result = run_script("prepare", *chat_data(dialogue, tokenizer_file, workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir / "dialogue"


@pytest.fixture(scope="module")
def pretrained(corpus_file: Path, tokenizer_file: Path, workdir: Path) -> Path:
    """A small model pretrained on the play's text with the BPE."""
    data = ("data=text", "data.name=play", f"data.source={corpus_file}", f"data.tokenizer={tokenizer_file}")
    assert run_script("prepare", *data, f"paths.data_dir={workdir}").returncode == 0
    run = workdir / "pretrained"
    trained = run_script(
        "train",
        *DEBUG_RUN,
        *MODEL,
        *data,
        f"paths.data_dir={workdir}",
        f"hydra.run.dir={run}",
        "train.max_iters=40",
        "train.batch_size=16",
        "train.eval_interval=40",
        "train.log_interval=50",
        "optim.lr=3e-3",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def fine_tuned(prepared: Path, pretrained: Path, dialogue: Path, tokenizer_file: Path, workdir: Path) -> Path:
    """experiment=sft from the pretrained checkpoint: three passes over the conversations."""
    run = workdir / "sft"
    trained = run_script(
        "train",
        *fine_tuning(pretrained, dialogue, tokenizer_file, workdir),
        f"hydra.run.dir={run}",
        "train.epochs=3",
        "train.batch_size=16",
        "train.eval_interval=40",
        "train.eval_iters=4",
        "train.log_interval=10",
        "train.plot=false",
        "train.report=false",
        "optim.lr=3e-3",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    return run


def rendered(conversation: dict, tokenizer: BpeTokenizer) -> list[tuple[list[int], list[int]]]:
    """The documents (tokens, mask) a conversation should make, written out here from the template's
    definition: a system message joins the first user message; a turn that would take a document past
    MAX_CONVERSATION_TOKENS starts the next one."""
    special = tokenizer.special
    said = [m["content"] for m in conversation["messages"]]
    if conversation["messages"][0]["role"] == "system":
        said = [said[0] + "\n\n" + said[1], *said[2:]]
    documents, tokens, mask = [], [special["<|bos|>"]], [0]
    for user, reply in zip(said[0::2], said[1::2], strict=True):
        asked = [special["<|user_start|>"], *tokenizer.encode(user), special["<|user_end|>"]]
        answer = [*tokenizer.encode(reply), special["<|assistant_end|>"]]
        turn = [*asked, special["<|assistant_start|>"], *answer]
        if len(tokens) > 1 and len(tokens) + len(turn) > MAX_CONVERSATION_TOKENS:
            documents.append((tokens, mask))
            tokens, mask = [special["<|bos|>"]], [0]
        tokens += turn
        mask += [0] * (len(asked) + 1) + [1] * len(answer)
    documents.append((tokens, mask))
    return documents


def test_the_mask_is_1_exactly_on_the_assistants_tokens(prepared: Path, dialogue: Path) -> None:
    """Every conversation's documents, in train or val, are the template's rendering, with mask 1 on each
    reply and the <|assistant_end|> that closes it, 0 on everything else."""
    data = open_prepared(prepared)
    assert data.chat and data.meta.settings["format"] == "chat"
    tokenizer = data.tokenizer
    assert isinstance(tokenizer, BpeTokenizer)
    bos = tokenizer.special["<|bos|>"]
    found = []
    for split in ("train", "val"):
        tokens = data.splits[split].read(0, len(data.splits[split]))
        mask = data.masks[split].read(0, len(data.masks[split]))
        assert len(tokens) == len(mask) and set(np.unique(mask).tolist()) == {0, 1}
        starts = [*np.flatnonzero(tokens == bos).tolist(), len(tokens)]
        assert starts[0] == 0
        found += [(tokens[a:b].tolist(), mask[a:b].tolist()) for a, b in itertools.pairwise(starts)]
    conversations = [json.loads(line) for line in dialogue.read_text().splitlines()]
    expected = [document for conversation in conversations for document in rendered(conversation, tokenizer)]
    assert sorted(map(str, found)) == sorted(map(str, expected))
    assert len(expected) > len(conversations)  # some conversations were cut between their turns
    # the first conversation's system message opens its first user message
    first = rendered(conversations[0], tokenizer)[0][0]
    assert tokenizer.decode(first[2:]).startswith("You are a citizen of Rome.\n\n")
    # the masked tokens say exactly the replies
    replies = [m["content"] for c in conversations for m in c["messages"] if m["role"] == "assistant"]
    end = tokenizer.special["<|assistant_end|>"]
    said = [tokenizer.decode([t for t, m in zip(*d, strict=True) if m and t != end]) for d in expected]
    assert "".join(said) == "".join(replies)


def test_fine_tuning_lowers_the_masked_val_loss(fine_tuned: Path, prepared: Path) -> None:
    """The val loss of every evaluation is over the replies only; fine-tuning brings it down. eval.py scores
    each val conversation once, on exactly the val split's reply tokens."""
    records = [json.loads(line) for line in (fine_tuned / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert val[-1] < val[0] - 1.0, val
    checkpoint = torch.load(fine_tuned / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["config"]["data"]["format"] == "chat" and checkpoint["tokenizer"]["kind"] == "bpe"
    scored = run_script("eval", f"ckpt={fine_tuned}", "task=val_loss", f"paths.data_dir={prepared.parent}")
    assert scored.returncode == 0, scored.stderr[-3000:]
    result = json.loads(scored.stdout.strip().splitlines()[-1])
    mask = open_prepared(prepared).masks["val"]
    assert result["n_tokens"] == int(mask.read(0, len(mask)).sum())


def test_user_tokens_add_nothing_to_the_gradient(prepared: Path, pretrained: Path) -> None:
    """The loss a chat batch trains on has no gradient through any position whose target is not a reply
    token, and the same gradient as the loss written out over the reply tokens alone."""
    data = open_prepared(prepared)
    loader = ChatBatchLoader(data.conversations("train"), 4, 64, False, 0, torch.device("cpu"))
    x, y = loader.next_batch()
    assert (y == IGNORE).any() and (y != IGNORE).any()
    model, _ = load_model(torch.load(pretrained / "checkpoints" / "last.pt", weights_only=True), torch.device("cpu"))
    logits, loss = model(x, y, reduction="sum")
    logits.retain_grad()
    loss.backward()
    assert logits.grad is not None
    assert logits.grad[y == IGNORE].abs().max() == 0 and logits.grad[y != IGNORE].abs().max() > 0
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits, _ = model(x)
    kept = y != IGNORE
    by_hand = -torch.log_softmax(logits[kept].float(), dim=-1).gather(1, y[kept][:, None]).sum()
    by_hand.backward()
    assert torch.allclose(loss, by_hand, rtol=1e-5)
    for mine, theirs in zip(ours, (p.grad for p in model.parameters()), strict=True):
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-7)


def test_a_steps_loss_is_the_mean_over_all_its_reply_tokens(
    prepared: Path, pretrained: Path, dialogue: Path, tokenizer_file: Path, workdir: Path, tmp_path: Path
) -> None:
    """With two micro-batches a step, the loss is the mean over the reply tokens of both (not the mean of
    each micro-batch's mean, which weights a reply token by how few its micro-batch holds)."""
    run = tmp_path / "run"
    trained = run_script(
        "train",
        *fine_tuning(pretrained, dialogue, tokenizer_file, workdir),
        f"hydra.run.dir={run}",
        "data.sampling=sequential",
        "train.epochs=null",
        "train.max_iters=1",
        "train.batch_size=2",
        "train.grad_accum_steps=2",
        "train.eval_iters=1",
        "train.log_interval=1",
        "train.plot=false",
        "train.report=false",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    logged = next(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line)
    model, _ = load_model(torch.load(pretrained / "checkpoints" / "last.pt", weights_only=True), torch.device("cpu"))
    loader = ChatBatchLoader(open_prepared(prepared).conversations("train"), 2, 64, False, 0, torch.device("cpu"))
    sums, counts = [], []
    with torch.no_grad():
        for x, y in (loader.next_batch(), loader.next_batch()):
            sums.append(model(x, y, reduction="sum")[1].item())
            counts.append(int((y != IGNORE).sum()))
    assert counts[0] != counts[1]
    assert logged["loss"] == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    assert abs(logged["loss"] - (sums[0] / counts[0] + sums[1] / counts[1]) / 2) > 1e-3


def test_packing_deals_every_conversation_once_an_epoch_and_resumes_exactly(prepared: Path) -> None:
    conversations = open_prepared(prepared).conversations("train")
    order = np.random.default_rng(0).permutation(len(conversations))
    packed, bounds = conversations.pack(order, 65)
    assert sorted(packed.tolist()) == list(range(len(conversations)))
    rows = [conversations.lengths[packed[a:b]] for a, b in itertools.pairwise(bounds)]
    assert all(row.sum() <= 65 or len(row) == 1 for row in rows)  # a conversation longer than a row fills one
    assert sum(min(row.sum(), 65) for row in rows) / (65 * len(rows)) > 0.85  # little padding
    loader = ChatBatchLoader(conversations, 8, 64, True, 1, torch.device("cpu"))
    for _ in range((loader.n_windows - 1) // 8):  # near the end of the first epoch: the next 3 batches cross it
        loader.next_batch()
    state = loader.state_dict()
    ahead = [loader.next_batch() for _ in range(3)]
    again = ChatBatchLoader(conversations, 8, 64, True, 1, torch.device("cpu"))
    again.load_state_dict(state)
    assert state["epoch"] == 0 and loader.epoch == 1
    for (x, y), (x2, y2) in zip(ahead, (again.next_batch() for _ in range(3)), strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_parquet_rows_and_question_answer_fields_make_the_same_documents(
    play: str, tokenizer_file: Path, tmp_path: Path
) -> None:
    """One exchange per record, as jsonl messages, as parquet rows (whose messages carry a timestamp too), as
    a Hugging Face dataset, and as jsonl question/answer fields: the same tokens and masks in the same splits."""
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    pairs = exchanges(play)[:80]
    as_messages = tmp_path / "messages.jsonl"
    as_messages.write_text("".join(json.dumps({"messages": messages([pair])}) + "\n" for pair in pairs))
    as_parquet = tmp_path / "messages.parquet"
    stamp = datetime.datetime(2026, 11, 28, tzinfo=datetime.timezone.utc)
    rows = [[{**m, "created": stamp} for m in messages([pair])] for pair in pairs]
    pq.write_table(pa.table({"messages": rows, "id": list(range(len(pairs)))}), as_parquet)
    hub = tmp_path / "hub"  # a Hugging Face dataset of local files: what hf:<name> loads, offline
    hub.mkdir()
    pq.write_table(pa.table({"messages": rows}), hub / "train.parquet")
    as_fields = tmp_path / "qa.jsonl"
    as_fields.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in pairs))
    sources = {
        "messages": (f"data.source={as_messages}",),
        "parquet": (f"data.source={as_parquet}",),
        "hf": (f"data.source=hf:{hub}",),
        "fields": (f"data.source={as_fields}", "data.prompt_field=question", "data.response_field=answer"),
    }
    made = {}
    for name, source in sources.items():
        args = ("data=chat", f"data.name={name}", f"data.tokenizer={tokenizer_file}", f"paths.data_dir={tmp_path}")
        result = run_script("prepare", *args, *source)
        assert result.returncode == 0, result.stderr[-3000:]
        data = open_prepared(tmp_path / name)
        made[name] = [
            (
                split,
                data.splits[split].read(0, len(data.splits[split])).tolist(),
                data.masks[split].read(0, len(data.masks[split])).tolist(),
            )
            for split in ("train", "val")
        ]
    assert made["messages"] == made["parquet"] == made["hf"] == made["fields"]
    assert all(len(tokens) > 0 for _, tokens, _ in made["messages"])


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_a_conversation_past_the_block_is_the_same_with_the_cache_and_without(
    tokenizer_file: Path, positions: str
) -> None:
    """The history outgrows the block in the fourth turn: the cache kept across turns, then given up, gives
    the very replies that recomputing the context gives."""
    from hydragpt.chat_session import Conversation
    from hydragpt.sampling import Settings

    tokenizer = BpeTokenizer(json.loads(tokenizer_file.read_text()))
    torch.manual_seed(0)
    config = GPTConfig(
        n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=tokenizer.vocab_size, positions=positions
    )
    model = GPT(config).eval()
    with torch.no_grad():  # weights large enough that every token of the context sways the greedy choice
        for param in model.parameters():
            param.normal_(0, 1.0)
    said = ["Who is there?", "Nay, answer me.", "Long live the king!", "Peace, break thee off.", "Go!", "Stay."]
    fed = []  # (tokens fed, tokens already in the cache) of every forward
    forward = model.forward
    model.forward = lambda idx, *args, cache=None, **kwargs: (  # type: ignore[method-assign]
        fed.append((idx.size(1), cache.length if cache is not None else None))
        or forward(idx, *args, cache=cache, **kwargs)
    )
    replies = {}
    for use_cache in (True, False):
        conversation = Conversation(model, ChatTemplate(tokenizer), use_cache)
        settings = Settings(8, 0.0, None, None, [], use_cache)
        replies[use_cache] = [conversation.reply(m, settings, torch.Generator(), torch.float32) for m in said]
        assert len(conversation.tokens) > 1.5 * config.block_size
    assert sum(1 for n, cached in fed if n > 1 and cached) >= 2  # later turns fed only their own tokens
    assert replies[True] == replies[False] and len(set(replies[True])) > 1


@pytest.mark.slow
def test_two_ranks_fine_tune_as_one_process_does(
    prepared: Path, pretrained: Path, dialogue: Path, tokenizer_file: Path, workdir: Path, tmp_path: Path
) -> None:
    """Two ranks of two rows each, and one process of two micro-batches of two rows: the same rows, so the same
    losses, gradient norms and val losses (the loss is the mean over all ranks' reply tokens)."""
    args = (
        *fine_tuning(pretrained, dialogue, tokenizer_file, workdir),
        "data.sampling=sequential",
        "train.epochs=null",
        "train.max_iters=3",
        "train.eval_interval=3",
        "train.eval_iters=2",
        "train.batch_size=2",
        "train.log_interval=1",
        "train.plot=false",
        "train.report=false",
    )
    one = run_script("train", *args, "train.grad_accum_steps=2", f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(2, *args, f"hydra.run.dir={tmp_path / 'two'}", cwd=REPO)
    assert two.returncode == 0, two.stderr[-3000:]
    records = {
        run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("one", "two")
    }
    assert len(records["one"]) == len(records["two"]) == 5  # evaluations at 0 and 3, steps 0, 1, 2
    for mine, theirs in zip(records["one"], records["two"], strict=True):
        for key in ("loss", "grad_norm", "val_loss", "train_loss"):
            assert (key in mine) == (key in theirs)
            if key in mine:
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5), key


def greedy_reply(model: GPT, tokens: list[int], end: int, vocab: int, limit: int) -> tuple[list[int], bool]:
    """The reply greedy decoding gives, the whole context recomputed for each token; whether it ended."""
    reply: list[int] = []
    with torch.no_grad():
        for _ in range(limit):
            assert len(tokens) + len(reply) <= model.config.block_size
            logits, _ = model(torch.tensor([tokens + reply]))
            token = int(logits[0, -1, :vocab].argmax())
            if token == end:
                return reply, True
            reply.append(token)
    return reply, False


def chat(run: Path, lines: list[str], *args: str) -> subprocess.CompletedProcess:
    """sample.py chat=true reading `lines` from a pipe, greedy."""
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "sample.py"), f"ckpt={run}", "chat=true", "temperature=0", *args],
        input="".join(f"{line}\n" for line in lines),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_chat_over_a_pipe_keeps_three_turns_and_stops_at_the_end_token(fine_tuned: Path) -> None:
    """Each reply is what greedy decoding of the whole conversation so far gives, up to the model's
    <|assistant_end|>; `/history` shows the three turns, `/clear` forgets them."""
    asked = ["Who is there?", "What news?", "Farewell, my lord."]
    session = chat(fine_tuned, [*asked, "/history", "/clear", asked[0], "quit"], "max_new_tokens=24")
    assert session.returncode == 0, session.stderr[-3000:]
    out = session.stdout.splitlines()
    replies = out[:3]
    assert out[3:9] == [line for q, a in zip(asked, replies, strict=True) for line in (f"user: {q}", f"assistant: {a}")]
    assert out[9] == replies[0] and len(out) == 10
    model, tokenizer = load_model(
        torch.load(fine_tuned / "checkpoints" / "last.pt", weights_only=True), torch.device("cpu")
    )
    special = tokenizer.special
    history = [special["<|bos|>"]]
    for question, reply in zip(asked, replies, strict=True):
        history += [special["<|user_start|>"], *tokenizer.encode(question), special["<|user_end|>"]]
        history += [special["<|assistant_start|>"]]
        expected, ended = greedy_reply(model, history, special["<|assistant_end|>"], tokenizer.vocab_size, 24)
        assert ended and tokenizer.decode(expected) == reply
        history += [*expected, special["<|assistant_end|>"]]


def test_a_model_on_gpt2s_encoding_gains_the_chat_tokens(gpt2_bpe: None, dialogue: Path, tmp_path: Path) -> None:
    """A chat dataset on GPT-2's encoding adds the chat tokens after its 50,257; fine-tuning a GPT-2 (hf:<dir>)
    on it grows the model to 50,304 rows, and its export renders conversations as hydragpt does."""
    hf_gpt2(tmp_path / "hf")
    data = ("data=chat", f"data.source={dialogue}", "data.max_conversation_tokens=65", f"paths.data_dir={tmp_path}")
    prepared = run_script("prepare", *data)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    meta = json.loads((tmp_path / "chat" / "meta.json").read_text())
    assert meta["tokenizer"] == {"kind": "tiktoken", "name": "gpt2", "chat": True} and meta["vocab_size"] == 50261
    run = tmp_path / "run"
    trained = run_script(
        "train", "experiment=sft", *data, "system=cpu", f"train.init_from=hf:{tmp_path / 'hf'}", f"hydra.run.dir={run}",
        "train.epochs=null", "train.max_iters=2", "train.batch_size=2", "train.eval_iters=1", "train.plot=false",
        "train.report=false",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (
        "the chat tokens (ids 50257 to 50260) start as the mean of the 50,257 tokens the model knows" in trained.stdout
    )
    assert "(vocab_size 50257 -> 50304)" in trained.stdout
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["model"]["transformer.wte.weight"].shape[0] == 50304
    exported = run_script("export", f"ckpt={run}", f"out={tmp_path / 'out'}")
    assert exported.returncode == 0, exported.stderr[-3000:]
    import transformers

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    record = json.loads(dialogue.read_text().splitlines()[0])  # it opens with a system message
    tokenizer = TiktokenTokenizer("gpt2", chat=True)
    ours = ChatTemplate(tokenizer).render(turns(record, ["messages"], "dialogue"), 10_000)[0][0].tolist()
    assert hf_tokenizer.apply_chat_template(record["messages"], tokenize=True, return_dict=False) == ours
    assert hf_tokenizer.eos_token_id == tokenizer.special["<|assistant_end|>"] == 50260


@pytest.mark.parametrize("tied", [True, False])
def test_new_tokens_start_as_the_mean_of_the_known_ones(tied: bool) -> None:
    """Rows past the known tokens start as their mean, whether the table must grow (GPT-2's 50,257) or
    already has them (a model padded to 50,304)."""
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=12, tie_embeddings=tied))
    old = [model.transformer.wte.weight.detach().clone(), model.lm_head.weight.detach().clone()]
    model.add_tokens(10, 12)  # padded already: rows 10 and 11 are leftovers
    model.add_tokens(10, 16)
    tables = [model.transformer.wte.weight, model.lm_head.weight]
    assert model.config.vocab_size == 16 and (tables[0] is tables[1]) == tied
    for table, before in zip(tables, old, strict=True):
        assert table.shape == (16, 16) and torch.equal(table[:10], before[:10])
        assert torch.allclose(table[10:], before[:10].mean(0).expand(6, -1))
    assert model(torch.tensor([[15, 3]]))[0].shape == (1, 2, 16)


def test_chat_data_mistakes_are_one_line(
    dialogue: Path, corpus_file: Path, tokenizer_file: Path, tmp_path: Path
) -> None:
    def error(*args: str) -> str:
        result = run_script(
            "prepare", "data=chat", f"paths.data_dir={tmp_path}", f"data.tokenizer={tokenizer_file}", *args
        )
        assert result.returncode == 2, result.stderr[-3000:]
        return result.stderr.strip().splitlines()[-1]

    assert error(f"data.source={dialogue}", "data.tokenizer=char") == (  # the last data.tokenizer counts
        "error: data.format=chat needs a tokenizer that can hold the chat template's tokens, not data.tokenizer=char"
        " (use a tiktoken encoding (gpt2) or a tokenizer of scripts/train_tokenizer.py)"
    )
    assert error(f"data.source={corpus_file}").startswith(
        f"error: data.format=chat reads conversations from .jsonl or .parquet records, not {corpus_file}"
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": messages([("Hail!", "Hail.")])[::-1]}) + "\n")
    assert error(f"data.source={bad}") == (
        f"error: {bad}: a conversation's messages must alternate user and assistant, starting with the user (a"
        " system message may come first), but message 1 of 2 is 'assistant' (fix or leave out that conversation)"
    )
    assert error(f"data.source={bad}", "data.text_field=turns").startswith(
        f"error: {bad} has a record without the field 'turns'"
    )
    assert error(f"data.source={dialogue}", "data.prompt_field=question").startswith(
        "error: data.prompt_field and data.response_field go together"
    )
