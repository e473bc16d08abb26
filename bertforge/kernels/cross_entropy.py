"""Linear layer and cross-entropy in one op, its gradients computed in the forward, a chunk of rows at a time.

The MLM decoder turns each labelled position into vocabulary-sized logits (30,522 per row for BERT) only to
reduce them to one loss. `F.cross_entropy(F.linear(x, W, b), t)` writes that (rows, vocab) matrix four times
over a step (the logits, their log-softmax, the zero-filled gradient of the loss, the gradient of the
log-softmax), each a fresh allocation of tens of megabytes that a CPU's allocator maps and the kernel zero-fills
page by page. Here a chunk of rows goes through logits -> softmax -> gradient in one buffer, whose gradient
then feeds the two matmuls that give the input's and the weight's gradients; the loss's backward only scales
the stored gradients by the incoming one. The same torch ops run on a GPU, where the chunking also bounds
the memory to one chunk's logits.

Matmuls run in autocast's dtype when autocast is on, the softmax, the loss and the accumulated gradients in
fp32 (fp64 for fp64 inputs).
"""

import torch

# A chunk's logits hold as many elements as the input x (so the op's memory stays about that of its input),
# and at least 2**21 (8 MB in fp32): small enough for a CPU allocator to reuse the buffer from chunk to chunk,
# large enough for the matmuls to stay efficient.
_MIN_CHUNK_ELEMENTS = 1 << 21


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, targets, chunk_rows, with_gradients):
        dtype = _matmul_dtype(x)
        accumulate = torch.promote_types(dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            xs, ws, bs = x.to(dtype), weight.to(dtype), bias.to(dtype)
            rows = x.shape[0]
            if with_gradients:  # evaluation allocates none of them (the weight's is as large as the embeddings)
                grad_x = torch.empty(x.shape, dtype=accumulate, device=x.device)
                grad_w = torch.zeros(weight.shape, dtype=accumulate, device=x.device)
                grad_b = torch.zeros(bias.shape, dtype=accumulate, device=x.device)
            loss = torch.zeros((), dtype=accumulate, device=x.device)
            # One buffer for every chunk's logits: a fresh one per chunk costs its page faults each time on a CPU.
            buffer = torch.empty(min(rows, chunk_rows), weight.shape[0], dtype=dtype, device=x.device)
            for start in range(0, rows, chunk_rows):
                x_chunk, t_chunk = xs[start:start + chunk_rows], targets[start:start + chunk_rows]
                picked = torch.arange(t_chunk.shape[0], device=x.device)
                logits = torch.addmm(bs, x_chunk, ws.t(), out=buffer[:t_chunk.shape[0]]).to(accumulate)
                row_max = logits.amax(1, keepdim=True)
                target_logit = logits[picked, t_chunk]
                probs = logits.sub_(row_max).exp_()
                total = probs.sum(1, keepdim=True)
                loss += (total.log() + row_max).sum() - target_logit.sum()
                if not with_gradients:
                    continue
                # d(loss_i)/d(logits_i) = softmax_i - onehot(t_i), made in place.
                grad_logits = probs.div_(total)
                grad_logits[picked, t_chunk] -= 1.0
                grad_b += grad_logits.sum(0)
                grad_logits = grad_logits.to(dtype)
                grad_x[start:start + chunk_rows] = grad_logits @ ws
                if dtype == accumulate:
                    grad_w.addmm_(grad_logits.t(), x_chunk)
                else:
                    grad_w += grad_logits.t() @ x_chunk
            scale = 1.0 / max(rows, 1)  # the mean over rows; no row gives loss 0 and zero gradients
            if with_gradients:
                ctx.save_for_backward(grad_x.mul_(scale).to(x.dtype), grad_w.mul_(scale).to(weight.dtype),
                                      grad_b.mul_(scale).to(bias.dtype))
            return loss * scale

    @staticmethod
    def backward(ctx, grad_loss):
        # Scaled in place (the weight's gradient is as large as the embedding matrix): a second backward through
        # the same graph finds them modified and raises, as autograd does for any saved tensor changed in place.
        return *(g.mul_(grad_loss) for g in ctx.saved_tensors), None, None, None


# Left out of torch.compile's graphs: traced, the chunk loop would be specialised on the number of rows, and every
# batch with a new count of labelled positions would compile again until the recompile limit.
@torch.compiler.disable
def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """mean_i cross_entropy(x_i @ weight.T + bias, targets_i), without keeping the (rows, vocab) logits.

    x (rows, hidden), weight (vocab, hidden), bias (vocab,), targets (rows,) of class ids in [0, vocab) (no
    ignored rows: select the labelled ones first). Zero rows give loss 0 and zero gradients. chunk_rows: rows
    per chunk (default: max(x.numel(), 2**21) logits per chunk)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x (rows, hidden) and weight (vocab, hidden) expected, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if bias.shape != (weight.shape[0],) or targets.shape != (x.shape[0],):
        raise ValueError(f"bias ({weight.shape[0]},) and targets ({x.shape[0]},) expected, got "
                         f"{tuple(bias.shape)} and {tuple(targets.shape)}")
    chunk_rows = chunk_rows or max(1, max(x.numel(), _MIN_CHUNK_ELEMENTS) // weight.shape[0])
    # Without autograd (evaluation) the forward skips the gradient matmuls.
    with_gradients = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, bias))
    return _LinearCrossEntropy.apply(x, weight, bias, targets, chunk_rows, with_gradients)
