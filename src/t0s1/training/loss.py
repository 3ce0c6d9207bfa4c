"""The completion-only loss on a CPU: logits only where the completion is.

TRL computes the SFT loss with a fused LM head that never holds the ``[tokens, vocabulary]``
logits. On CUDA and XPU its Triton kernel scores only the positions that carry labels. Elsewhere
its torch fallback scores every position of the padded batch (the prompt and the padding too), and
it computes the logged entropy and top-1 accuracy over the whole vocabulary in several more
passes. On the quickstart's CPU steps that fallback was half of each step.

On a CPU, ``CompletionLossTrainer`` asks the model for the logits of the last positions of the
batch, from the first one that predicts a completion token (``logits_to_keep``: the model's own
head, with its own scaling). It then takes the cross-entropy there. The loss is TRL's: summed over
the completion tokens and divided by their count, or by ``num_items_in_batch`` under gradient
accumulation. The logged ``entropy`` and ``mean_token_accuracy`` are TRL's too.

Everything else goes to TRL unchanged: GPUs, other loss types, label smoothing, a custom loss
function, MoE auxiliary losses, sequence parallelism, and batches whose logits would exceed
``MAX_LOGITS_BYTES``.
"""

from __future__ import annotations

#: Logits of one batch above this size (float32 bytes) take TRL's chunked head instead.
MAX_LOGITS_BYTES = 1 << 30


def trainer_class():
    """``trl.SFTTrainer`` with the CPU loss above (a function: TRL is imported when training starts)."""
    import torch
    import torch.nn.functional as F
    from trl import SFTTrainer

    class CompletionLossTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            first = None if return_outputs else self._first_completion_position(model, inputs)
            if first is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            # Logits at position p predict the token at p + 1: keep the positions from ``first``
            # (the first one whose next token is a completion token) to the end of the batch.
            labels = inputs["labels"]
            kept = labels.shape[1] - first
            forward_inputs = {key: value for key, value in inputs.items() if key != "labels"}
            logits = model(**forward_inputs, use_cache=False, logits_to_keep=kept).logits[:, -kept:]
            targets = labels[:, first + 1 :]
            mask = targets != -100
            targets = targets[mask]  # the rows of other examples' prompts and padding drop out here
            log_probs = logits[:, :-1][mask].float().log_softmax(-1)
            del logits  # only the completion's rows stay in memory
            loss_sum = F.nll_loss(log_probs, targets, reduction="sum")
            num_tokens = len(targets) if num_items_in_batch is None else num_items_in_batch
            loss = loss_sum / torch.as_tensor(num_tokens).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as TRL: DDP averages the gradients
            self._log_token_metrics(log_probs.detach(), targets, inputs)
            return loss

        def _first_completion_position(self, model, inputs) -> int | None:
            """The first position whose logits the loss needs, where this loss applies (see the
            module's docstring); None: TRL's loss."""
            labels = inputs.get("labels")
            if labels is None or labels.device.type != "cpu":
                return None
            if "attention_mask" not in inputs or "shift_labels" in inputs:
                return None  # padding-free and sequence-parallel batches
            if self.args.loss_type != "nll" or self.label_smoother is not None:
                return None
            if self.compute_loss_func is not None or getattr(self, "aux_loss_enabled", False):
                return None
            unwrapped = self.accelerator.unwrap_model(model)  # DDP's wrapper has no get_output_embeddings
            if not _takes_logits_to_keep(unwrapped):
                return None
            predicts_completion = (labels[:, 1:] != -100).any(0)
            if not bool(predicts_completion.any()):
                return None  # TRL's head turns an all-masked batch into a differentiable zero
            first = int(torch.nonzero(predicts_completion)[0])
            vocab = unwrapped.get_output_embeddings().weight.shape[0]
            if labels.shape[0] * (labels.shape[1] - first) * vocab * 4 > MAX_LOGITS_BYTES:
                return None
            return first

        def _log_token_metrics(self, log_probs, targets, inputs) -> None:
            """The per-step metrics TRL logs: entropy and top-1 accuracy on the completion tokens,
            and the count of tokens trained so far."""
            metrics = getattr(self, "_metrics", None)
            if metrics is None:
                return
            mode = "train" if self.model.training else "eval"
            gather = self.accelerator.gather_for_metrics
            num_valid = gather(torch.tensor(len(targets))).sum()
            entropy = -(log_probs.exp() * log_probs).sum()
            correct = (log_probs.argmax(-1) == targets).sum()
            entropy, correct = gather(entropy).sum(), gather(correct).sum()
            metrics[mode]["entropy"].append((entropy / num_valid).item() if num_valid > 0 else 0.0)
            metrics[mode]["mean_token_accuracy"].append((correct / num_valid).item() if num_valid > 0 else 0.0)
            if hasattr(self, "_total_train_tokens"):
                if mode == "train":
                    self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item()
                metrics[mode]["num_tokens"] = [self._total_train_tokens]

    return CompletionLossTrainer


def _takes_logits_to_keep(model) -> bool:
    """Whether the (PEFT-unwrapped) model's forward has ``logits_to_keep``, as transformers' causal
    LMs do; a remote-code model may not."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(type(base).forward).parameters
