"""The training step the CPU step benchmarks time, the same for every provider."""


def train_step(model, optimizer, inputs):
    """Forward, the model's own loss, backward and one optimizer step; returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    return loss
