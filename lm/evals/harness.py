"""nnx-lm as an lm-evaluation-harness model, registered with lm_eval as "nnx-lm".

It follows the conventions of lm_eval's own `hf` backend (lm_eval/models/huggingface.py), so that
the two give the same numbers on the same weights:
- a context and continuation are encoded whole and split at the context's length (TemplateLM's
  `_encode_pair`); an empty context is the prefix token (BOS where the tokenizer has one, else EOS);
- an input longer than the context keeps its last max_length + 1 tokens;
- rolling log-likelihood scores disjoint windows of the model's context (lm_eval.utils);
- generation encodes the prompt with the tokenizer's own rule, keeps its last
  max_length - max_gen_toks tokens, decodes only the new tokens and cuts them at the first stop string.

Scoring runs on lm.infer.score (batches of similar length, on the device), generation on
lm.infer.decode's KV-cached loop; both under the model's layout, so a model sharded over tensor or
fsdp devices evaluates as it is. In a multi-process job the backend is rank 0 of a world of 1 on
every process (TemplateLM's default): lm_eval splits no requests, every process runs all of them in
the same order (SPMD over the one mesh), and results come to every host through to_host.
"""

from collections.abc import Sequence

import lm_eval.models  # noqa: F401  (lm_eval's own backends first: get_model imports them only into an empty registry)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from lm.data.tokenizer import Tokenizer
from lm.errors import UserError
from lm.infer.decode import generate
from lm.infer.load import load_model
from lm.infer.sampling import Sampling
from lm.infer.score import score_continuations
from sharding.mesh import Layout

# Generation options a task may set that mean something here; any other is refused, not ignored.
_GENERATION_KEYS = {"do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty"}


@register_model("nnx-lm")
class NnxLM(TemplateLM):
    """model_args: run_dir=, checkpoint= or hf= (loaded as launch.generate and launch.score load),
    tensor= and fsdp= (devices the weights are split over), context= (devices each sequence is split
    over), batch_size=, max_gen_toks=, seed=.

    `NnxLM.of(model, tokenizer, layout)` wraps a model already in memory (training's live model).
    """

    def __init__(
        self,
        run_dir=None,
        checkpoint=None,
        hf=None,
        *,
        tensor: int = 1,
        fsdp: int = 1,
        context: int = 1,
        batch_size: int | str = 8,
        max_gen_toks: int = 256,
        seed: int = 0,
        device=None,  # lm_eval passes these two; the mesh decides both here
        max_batch_size=None,
        **unknown,
    ):
        super().__init__()
        if unknown:
            raise UserError(
                f"unknown nnx-lm model_args {sorted(unknown)}; it takes run_dir, checkpoint, hf, tensor, fsdp, "
                "context, batch_size, max_gen_toks, seed"
            )
        if str(batch_size).startswith("auto"):
            raise UserError("--batch-size auto is not supported by nnx-lm; give a number of sequences per batch")
        self.batch_size, self._max_gen_toks, self.seed = int(batch_size), int(max_gen_toks), int(seed)
        if self.batch_size < 1:
            raise UserError(f"batch_size={batch_size} must be at least 1")
        if (run_dir, checkpoint, hf) != (None, None, None):
            loaded = load_model(run_dir, checkpoint, hf, tensor=int(tensor), fsdp=int(fsdp), context=int(context))
            self._attach(loaded.model, loaded.tokenizer, loaded.layout, loaded.name)

    @classmethod
    def of(cls, model, tokenizer: Tokenizer, layout: Layout, *, batch_size: int = 8, name: str = "model") -> "NnxLM":
        lm = cls(batch_size=batch_size)
        lm._attach(model, tokenizer, layout, name)
        return lm

    def _attach(self, model, tokenizer: Tokenizer, layout: Layout, name: str) -> None:
        self.model, self.tokenizer, self.layout, self.name = model, tokenizer, layout, name
        bos = tokenizer.id_to_piece(tokenizer.bos_id) if tokenizer.bos_id is not None else None
        self._bos_text = bos if bos and tokenizer.kind != "sentencepiece" else None

    # ---- what lm_eval asks of a model ----------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        # lm_eval's hf rule: BOS when the tokenizer has one, else EOS. Our own sentencepiece runs never
        # saw a BOS: their documents are joined by EOS in training (as lm.infer.score scores them).
        t = self.tokenizer
        return t.bos_id if t.bos_id is not None and t.kind != "sentencepiece" else t.eos_id

    @property
    def max_length(self) -> int:
        return self.model.cfg.max_seq_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.path)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None and self._bos_text and string.startswith(self._bos_text):
            add_special_tokens = False  # the text brings its own BOS
        return self.tokenizer.encode(string, add_bos=None if add_special_tokens is None else add_special_tokens)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids) -> (log p, greedy) each."""
        items = []
        for _, context, continuation in requests:
            whole = (context + continuation)[-(self.max_length + 1) :]
            items.append((whole, len(continuation)))
        with self.layout:
            out = score_continuations(
                self.model, items, batch_size=self.batch_size, row_multiple=self.layout.batch_devices
            )
        for (key, _, _), answer in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood, in disjoint windows of the context (lm_eval's rule), all windows of
        all texts batched together."""
        windows, owner = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            rolling = get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1,
            )  # fmt: skip
            for context, continuation in map(make_disjoint_window, rolling):
                windows.append((None, context, continuation))
                owner.append(n)
        scores = self._loglikelihood_tokens(windows)
        totals = [0.0] * len(requests)
        for n, (logp, _) in zip(owner, scores):
            totals[n] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generate for each (context, gen_kwargs) until a stop string, EOS or max_gen_toks; requests
        with the same options run together, longest prompts first."""
        out = []
        reorder = Collator(
            [req.args for req in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
            group_by="gen_kwargs", group_fn=lambda r: r[1],
        )  # fmt: skip
        for chunk in reorder.get_batched(n=self.batch_size):
            contexts, options = zip(*chunk)
            texts = self._generate(list(contexts), dict(options[0]))
            for args, text in zip(chunk, texts):
                self.cache_hook.add_partial("generate_until", args, text)
            out.extend(texts)
        return reorder.get_original(out)

    def _generate(self, contexts: list[str], options: dict) -> list[str]:
        kwargs = normalize_gen_kwargs(options, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=None)
        max_new = kwargs.pop("max_gen_toks")
        unknown = set(kwargs) - _GENERATION_KEYS
        if unknown:
            raise UserError(
                f"generation option(s) {sorted(unknown)} are not supported by nnx-lm; "
                f"it takes {sorted(_GENERATION_KEYS | {'until', 'max_gen_toks'})}"
            )
        if max_new >= self.max_length:
            raise UserError(f"max_gen_toks={max_new} leaves no room for a prompt in the context of {self.max_length}")
        sampled = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 1.0)) > 0
        sampling = Sampling(
            temperature=float(kwargs.get("temperature", 1.0)) if sampled else 0.0,
            top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0),
            min_p=float(kwargs.get("min_p") or 0.0), repetition_penalty=float(kwargs.get("repetition_penalty", 1.0)),
        )  # fmt: skip
        prompts = [self.tok_encode(c)[-(self.max_length - max_new) :] for c in contexts]
        # Full batches of batch_size rows (a multiple of the batch devices): one compiled shape.
        rows = -(-self.batch_size // self.layout.batch_devices) * self.layout.batch_devices
        padded = prompts + [prompts[-1]] * (rows - len(prompts))
        produced: list[list[int]] = [[] for _ in padded]
        stop_ids = tuple(self.tokenizer.stop_ids or (self.eot_token_id,))

        def text_of(row: list[int]) -> str:
            return self.tok_decode([t for t in row if t not in stop_ids])

        def on_tokens(new):
            for row, toks in zip(produced, new.tolist()):
                row.extend(toks)
            return [any(s and s in text_of(row) for s in until) for row in produced] if until else None

        with self.layout:
            generate(
                self.model, padded, max_new_tokens=max_new, sampling=sampling, seed=self.seed, eos_id=stop_ids,
                chunk=8 if until else None, on_tokens=on_tokens,
            )  # fmt: skip
        return [postprocess_generated_text(text_of(row), until, None) for row in produced[: len(prompts)]]
