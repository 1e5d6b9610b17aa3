"""Word-level LSTM language model in the shape of pytorch/examples' word_language_model (tied weights, TBPTT).

    python examples/zoo/lstm_lm.py --steps 40                 # tiny, CPU
    python examples/zoo/lstm_lm.py --size gpu --steps 50      # 3 x 2048 LSTM, bptt 128, batch 128, one H200
A corpus batchified into columns, truncated back-propagation through time with the hidden state carried across
batches (detached), encoder/decoder weights tied, plain SGD with gradient clipping and LR decay on a plateau.
"""

import argparse
import math
import time

import torch
import torch.nn as nn

SIZES = {
    "tiny": dict(ntokens=200, emsize=64, nhid=64, nlayers=2, bptt=32, batch_size=16),
    # 3-layer LSTM 2048 (cuDNN), tied 2048 x 32k embedding (~165M params), 128 columns x 128 steps, fp32 (cuDNN
    # LSTMs are usually trained in fp32). Estimated, not measured: peak ~10 GiB (1.3 GiB weights+grads, ~2.5 GiB
    # LSTM reserve space, ~6 GiB fp32 logits/log-softmax and their gradients), ~250 ms/step on an H200.
    "gpu": dict(ntokens=32000, emsize=2048, nhid=2048, nlayers=3, bptt=128, batch_size=128),
}


class RNNModel(nn.Module):
    """Container module with an encoder, a recurrent module, and a decoder."""

    def __init__(self, ntoken, ninp, nhid, nlayers, dropout=0.2, tie_weights=True):
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        if tie_weights:
            if nhid != ninp:
                raise ValueError("When using the tied flag, nhid must be equal to emsize")
            self.decoder.weight = self.encoder.weight
        self.nhid, self.nlayers = nhid, nlayers
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output).view(-1, self.ntoken)
        return nn.functional.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        return (weight.new_zeros(self.nlayers, bsz, self.nhid), weight.new_zeros(self.nlayers, bsz, self.nhid))


def synthetic_corpus(n_tokens, ntokens, seed):
    """A 'text' from a sparse random bigram model with Zipf-like word frequencies."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.multinomial(1.0 / torch.arange(1, ntokens + 1).float(), ntokens * 4, replacement=True,
                             generator=g).view(ntokens, 4)
    chains = 256  # generated as 256 documents side by side, then concatenated
    length = n_tokens // chains + 1
    words = torch.empty(chains, length, dtype=torch.long)
    words[:, 0] = torch.randint(ntokens, (chains,), generator=g)
    pick = torch.randint(4, (chains, length), generator=g)
    for i in range(1, length):
        words[:, i] = succ[words[:, i - 1], pick[:, i]]
    return words.flatten()[:n_tokens]


def batchify(data, bsz, device):
    nbatch = data.size(0) // bsz
    return data[: nbatch * bsz].view(bsz, -1).t().contiguous().to(device)


def get_batch(source, i, bptt):
    seq_len = min(bptt, len(source) - 1 - i)
    return source[i : i + seq_len], source[i + 1 : i + 1 + seq_len].reshape(-1)


def repackage_hidden(h):
    """Wraps hidden states in new Tensors, to detach them from their history."""
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="TBPTT batches to train on")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--bptt", type=int)
    p.add_argument("--lr", type=float, default=20.0)
    p.add_argument("--clip", type=float, default=0.25)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=1111)
    p.add_argument("--log-interval", type=int, default=5)
    args = p.parse_args()
    cfg = SIZES[args.size]
    batch_size = args.batch_size or cfg["batch_size"]
    bptt = args.bptt or cfg["bptt"]
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    n_corpus = min(batch_size * bptt * (args.steps + 1) + 1, 2_000_000)
    train_data = batchify(synthetic_corpus(n_corpus, cfg["ntokens"], args.seed), batch_size, device)
    model = RNNModel(cfg["ntokens"], cfg["emsize"], cfg["nhid"], cfg["nlayers"]).to(device)
    criterion = nn.NLLLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.25, patience=2)
    print(f"LSTM LM: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {batch_size} columns x "
          f"{bptt} steps")

    model.train()
    hidden = model.init_hidden(batch_size)
    step, total_loss, start_time = 0, 0.0, time.time()
    while step < args.steps:
        for i in range(0, train_data.size(0) - 1, bptt):
            data, targets = get_batch(train_data, i, bptt)
            if data.size(0) < bptt:
                break
            hidden = repackage_hidden(hidden)
            optimizer.zero_grad()
            output, hidden = model(data, hidden)
            loss = criterion(output, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            total_loss += loss.item()
            step += 1
            if step % args.log_interval == 0 or step == args.steps:
                cur_loss = total_loss / args.log_interval
                elapsed = time.time() - start_time
                print(f"| step {step:5d} | lr {optimizer.param_groups[0]['lr']:02.2f} | ms/batch "
                      f"{elapsed * 1000 / args.log_interval:5.2f} | loss {cur_loss:5.2f} | ppl {math.exp(cur_loss):8.2f}")
                scheduler.step(cur_loss)
                total_loss, start_time = 0.0, time.time()
            if step >= args.steps:
                break


if __name__ == "__main__":
    main()
