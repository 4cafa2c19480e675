"""Knowledge distillation: a smaller student learns to behave like a teacher sharing its vocabulary.

`mode: logits` trains the student on the teacher's next-token distributions over the assistant tokens of the data
(Hinton et al. 2015, https://arxiv.org/abs/1503.02531): forward KL(teacher || student) covers every mode of the
teacher, reverse KL(student || teacher) seeks its main mode (MiniLLM, Gu et al. 2023), `jsd` sits in between
(generalized JSD of GKD, Agarwal et al. 2024, https://arxiv.org/abs/2306.13649, whose TRL implementation computes
the divergence here). Logits are softened by `temperature` and the loss scaled by T^2, as in Hinton et al.
`mode: sequence` is sequence-level distillation (Kim & Rush 2016, https://arxiv.org/abs/1606.07947): the teacher
answers every training prompt once, and the student is SFT-trained on those answers (SFT's trainer and lean loss).

TRL's DistillationTrainer and GKDTrainer distill on-policy (the student generates during training) from raw
messages; here the data layer's tokens and assistant-only labels are reused, so logit distillation is an SFTTrainer
whose loss compares logits with the teacher's.

The teacher is `method.teacher` (a model source), default the configured model itself; `student_layers: N` then
makes the student from the teacher's own weights, keeping N evenly spaced decoder layers (first and last included),
so no second model is downloaded. At the end the run directory gets distill_report.md: teacher vs student size,
forward speed, held-out perplexity and KL.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tunelab.adapters import ADAPTERS
from tunelab.errors import UserError
from tunelab.methods.contract import EstimateContext, Method
from tunelab.methods.distill_report import report_callback
from tunelab.methods.lean import lean_trainer_class
from tunelab.rollout import end_of_turn_id


class Config(BaseModel):
    """Options of `method: {name: distill, ...}`."""

    model_config = ConfigDict(extra="forbid")
    teacher: str | None = Field(None, description="teacher model source (hub id, dir, embedded:NAME); default: "
                                "model.source, with the student made from it by student_layers")
    student_layers: int | None = Field(None, gt=0, description="student = the model with only N evenly spaced "
                                       "decoder layers (initialized from the teacher's); None = model as loaded")
    mode: Literal["logits", "sequence"] = Field("logits", description="match teacher logits, or SFT on teacher answers")
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = Field("forward_kl", description="logits mode: divergence")
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="loss=jsd: interpolation of the generalized JSD")
    temperature: float = Field(2.0, gt=0, description="logits mode: softmax temperature (loss scaled by T^2)")
    hard_weight: float = Field(0.0, ge=0, le=1, description="logits mode: weight of the ordinary loss on the data's "
                               "own answers (1 - weight goes to the teacher)")
    max_new_tokens: int = Field(256, gt=0, description="sequence mode: longest teacher answer")
    teacher_temperature: float = Field(0.0, ge=0, description="sequence mode: 0 = greedy teacher answers")


def keep_layers(model, n: int):
    """The model with N of its decoder layers (evenly spaced, first and last kept), renumbered for the KV cache."""
    import torch

    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UserError(f"distill: student_layers needs a decoder with model.layers ({type(model).__name__} has none)")
    total = len(layers)
    if n >= total:
        raise UserError(f"distill: student_layers ({n}) must be fewer than the teacher's {total} layers")
    keep = sorted({round(i * (total - 1) / max(n - 1, 1)) for i in range(n)}) if n > 1 else [total - 1]
    model.model.layers = torch.nn.ModuleList(layers[i] for i in keep)
    for new, layer in enumerate(model.model.layers):
        if hasattr(getattr(layer, "self_attn", None), "layer_idx"):
            layer.self_attn.layer_idx = new
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return model


class Distill(Method):
    Config = Config
    activation_offloading = True  # TRL's SFTConfig.activation_offloading
    # prompt tuning and P-tuning lengthen the student's sequence by their virtual tokens, so its logits no longer line
    # up with the teacher's and the labels; prefix tuning keeps the sequence length
    adapters = ("none", "lora", "dora", "ia3", "prefix")
    loss_head = "logits"  # logits mode: both models' full logits and a divergence over them (sequence mode is lean)

    def student_config(self, opts: Config, model_config):
        """The student's config: the loaded model's with `student_layers` layers (keep_layers)."""
        if opts.student_layers:
            text = model_config.get_text_config()
            text.num_hidden_layers = opts.student_layers
            if getattr(text, "layer_types", None):
                text.layer_types = text.layer_types[:opts.student_layers]
        return model_config

    def loss_memory(self, opts: Config, ctx: EstimateContext) -> float | None:
        if opts.mode != "logits":
            return None  # sequence mode: SFT's lean loss
        # student and teacher logits over every position, both log-softmaxes at the temperature, the divergence and
        # the gradient back through them, in float32: 7 float32 tensors of the logits' size (configs/distill/
        # smollm2-half.yaml, 4 x 383 tokens: ~29 bytes of resident memory per logit, measured)
        return ctx.peak_tokens * ctx.arch["vocab"] * 28

    def extra_memory(self, cfg, opts: Config, ctx: EstimateContext) -> dict[str, float]:
        """The frozen teacher, loaded like the model (extra_models): method.teacher, or the configured model that the
        student is cut from."""
        return {"teacher": ctx.weight_bytes(ctx.architecture(opts.teacher or cfg.model.source))}

    def frozen_forwards(self, cfg, opts: Config, ctx: EstimateContext) -> list[dict]:
        """The teacher's forward over each batch: its logits (logits mode). Sequence mode samples the teacher's
        answers once, before training."""
        return [ctx.architecture(opts.teacher or cfg.model.source)] if opts.mode == "logits" else []

    def check(self, cfg, opts: Config, data) -> None:
        """Mistakes found before the model loads or the run directory is written."""
        if opts.student_layers is None and opts.teacher is None:
            raise UserError("distill: set method.teacher (the model to learn from) or method.student_layers (a "
                            "smaller student made from model.source, which is then the teacher)")
        a = ADAPTERS[cfg.adapter.type]
        if opts.student_layers and not (a.trains_base or a.mergeable):
            # the student exists only in this run: final/ is the student with its adapter merged (standalone.py),
            # never an adapter over model.source, which is the whole teacher
            raise UserError(f"distill: method.student_layers with adapter.type '{cfg.adapter.type}' cannot be saved "
                            "as a loadable student (the adapter cannot be merged into it); use adapter.type "
                            f"{' or '.join(n for n in self.adapters if ADAPTERS[n].mergeable)} or none")

    def merges_final(self, opts: Config) -> bool:
        # a student cut from the teacher's layers has no base on disk that an adapter could be loaded over: final/ is
        # the student itself, its adapter merged in (checkpoints keep the adapter, for resuming)
        return opts.student_layers is not None

    def prepare_model(self, cfg, opts: Config, model):
        """Shrink the loaded model into the student (before adapters attach) when `student_layers` is set."""
        return model if opts.student_layers is None else keep_layers(model, opts.student_layers)

    def extra_models(self, cfg, opts: Config, precision: str) -> dict:
        """The teacher, loaded like the model (same dtype and quantization), frozen."""
        from tunelab import models

        tcfg = cfg.model_copy(deep=True)
        tcfg.model.source = opts.teacher or cfg.model.source
        teacher = models.load_model(tcfg, precision=precision).eval()
        teacher.requires_grad_(False)
        return {"teacher": teacher}

    def lean_loss(self, opts: Config) -> bool:
        """Sequence mode scores only the answer tokens through the LM head, as SFT does by default (methods/lean.py);
        logits mode compares the full logits of both models."""
        return opts.mode == "sequence"

    def build(self, cfg, opts: Config, model, tokenizer, data, args: dict, teacher=None):
        from datasets import Dataset
        from trl import SFTConfig

        if teacher is None:
            raise UserError("distill: no teacher model was loaded")
        if teacher.config.get_text_config().vocab_size != model.config.get_text_config().vocab_size:
            raise UserError("distill: teacher and student vocabularies differ; logit distillation needs one "
                            "tokenizer")
        teacher.to(model.device)
        rows = data.train
        if opts.mode == "sequence":
            rows = teacher_answers(teacher, tokenizer, rows, opts, cfg.data.max_length)
        sft_args = SFTConfig(**args, max_length=cfg.data.max_length,
                             activation_offloading=cfg.training.activation_offloading is True)
        # sequence mode is SFT on the teacher's answers: it takes SFT's trainer and its default (lean) loss
        trainer_cls = lean_trainer_class() if opts.mode == "sequence" else _logit_trainer(opts)
        trainer = trainer_cls(model=model, args=sft_args, train_dataset=Dataset.from_list(rows),
                              eval_dataset=Dataset.from_list(data.validation) if data.validation else None,
                              processing_class=tokenizer)
        if opts.mode == "sequence":
            trainer.lean = self.lean_loss(opts)
        trainer.teacher = teacher
        held_out = data.validation or data.train[-16:]
        trainer.add_callback(report_callback(teacher, held_out))
        return trainer


def _logit_trainer(opts: Config):
    from trl import SFTTrainer

    class LogitDistillTrainer(SFTTrainer):
        """SFT on the data's tokens, with the loss measured against the teacher's softened distributions."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            labels = inputs["labels"]
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
            # the teacher is called directly, outside the forward accelerate wrapped in autocast: enter mixed precision
            # here too, or its CPU matmuls run in float32 (configs/distill/smollm2-half.yaml: 1.0 s of a 3.3 s step)
            with torch.no_grad(), self.accelerator.autocast():
                t_logits = self.teacher(input_ids=inputs["input_ids"],
                                        attention_mask=inputs.get("attention_mask")).logits
            loss = distill_loss(outputs.logits[:, :-1], t_logits[:, :-1], labels[:, 1:], opts.loss,
                                opts.temperature, opts.jsd_beta)
            if opts.hard_weight:
                hard = torch.nn.functional.cross_entropy(outputs.logits[:, :-1].flatten(0, 1).float(),
                                                         labels[:, 1:].flatten(), ignore_index=-100)
                loss = opts.hard_weight * hard + (1 - opts.hard_weight) * loss
            return (loss, outputs) if return_outputs else loss

    return LogitDistillTrainer


def distill_loss(student_logits, teacher_logits, labels, kind: str = "forward_kl", temperature: float = 1.0,
                 jsd_beta: float = 0.5):
    """Mean per-token divergence over positions whose label is trained, times T^2 (Hinton et al.)."""
    from trl.experimental.gkd import GKDTrainer

    beta = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": jsd_beta}[kind]  # TRL's generalized JSD endpoints
    # GKD's beta=0 is KL(teacher || student) (forward), beta=1 is KL(student || teacher) (reverse)
    div = GKDTrainer.generalized_jsd_loss(student_logits.float(), teacher_logits.float(), labels=labels, beta=beta,
                                          temperature=temperature)
    return div * temperature ** 2


def teacher_answers(teacher, tokenizer, rows: list[dict], opts: Config, max_length: int) -> list[dict]:
    """Training rows whose answers are the teacher's: each prompt (the tokens before the first trained label) is
    answered by the teacher, batched with the KV cache (tunelab's generation engine)."""
    from tunelab.inference.engine import GenParams, complete

    prompts = []
    for r in rows:
        first = next((i for i, x in enumerate(r["labels"]) if x != -100), len(r["labels"]))
        prompts.append(tokenizer.decode(r["input_ids"][:first]))
    params = GenParams(max_new_tokens=opts.max_new_tokens, temperature=opts.teacher_temperature, seed=0)
    answers = complete(teacher, tokenizer, prompts, params)
    eot = end_of_turn_id(tokenizer)
    out = []
    for prompt, ans in zip(prompts, answers):
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(ans.text, add_special_tokens=False)["input_ids"]
        if ans.finish_reason == "stop":
            a_ids = a_ids + [eot]  # the student learns to stop where the teacher stopped
        ids = (p_ids + a_ids)[:max_length]
        out.append({"input_ids": ids, "labels": ([-100] * len(p_ids) + a_ids)[:max_length]})
    return out


METHOD = Distill()
