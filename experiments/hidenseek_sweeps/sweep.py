"""Run named experiments sequentially, one process; append results to results.jsonl."""
# ruff: noqa: E402  (sys.path and torch threads are set before the project imports)

import json
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
import harness
import torch
from torch.nn import functional as F

import fedprune.hidenseek.site as client
from fedprune.hidenseek import sign_supermask as sm
from fedprune.hidenseek.aggregate import signs_of_scores

BASE = ["federation.num_clients=3", "federation.min_clients=3", "protocol.alpha=0.1", "protocol.density=0.5"]
orig_train_scores = sm.train_scores


def restricted_train_scores(model, x, y, epochs, lr, batch_size, seed, optimizer="sgd", momentum=0.9):
    present = torch.bincount(y, minlength=10) > 0
    adjust = torch.where(present, 0.0, float("-inf"))
    import copy

    trained = copy.deepcopy(model).train()
    scores = [layer.scores for layer in sm.supermask_layers(trained).values()]
    opt = (
        torch.optim.Adam(scores, lr=lr)
        if optimizer == "adam"
        else torch.optim.SGD(scores, lr=lr, momentum=momentum)
    )
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for b in sm.minibatch_indices(x.shape[0], batch_size, g):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(trained(x[b]) + adjust, y[b]).backward()
            opt.step()
    return trained


def weighted_vote(job, ups, state, ctx):
    stack = torch.stack([u.values for u in ups]).double()
    w = torch.tensor([u.num_examples for u in ups], dtype=torch.float64)
    return signs_of_scores((w[:, None] * stack).sum(0), state)


def margin_vote(q):
    def agg(job, ups, state, ctx):
        stack = torch.stack([u.values for u in ups]).to(torch.int32)
        disagree = (stack != state.to(torch.int32)).double().mean(0)
        return torch.where(disagree >= q - 1e-9, -state, state).to(torch.int8)

    return agg


def accum_vote(beta):
    def agg(job, ups, state, ctx):
        stack = torch.stack([u.values for u in ups]).double()
        S = ctx.get("S")
        if S is None:
            S = state.double()  # start from current codes with weight 1
        S = beta * S + stack.mean(0)
        ctx["S"] = S
        return signs_of_scores(S, state)

    return agg


AGGS = {
    "weighted": weighted_vote,
    "margin67": margin_vote(0.66),
    "margin100": margin_vote(1.0),
    "accum0.5": accum_vote(0.5),
    "accum0.8": accum_vote(0.8),
    "accum0.9": accum_vote(0.9),
}


def main():
    for spec in sys.argv[1:]:
        name, *rest = spec.split("|")
        over = [o for o in rest if "=" in o and not o.startswith("agg=") and o != "restricted"]
        agg = next((AGGS[o[4:]] for o in rest if o.startswith("agg=")), None)
        restricted = "restricted" in rest
        client.train_scores = restricted_train_scores if restricted else orig_train_scores
        t = time.time()
        accs = harness.run(BASE + over, agg)
        rec = {
            "name": name,
            "over": rest,
            "final": round(accs[-1], 3),
            "best": round(max(accs), 3),
            "last5": round(sum(accs[-5:]) / 5, 3),
            "acc": [round(a, 3) for a in accs],
            "s": round(time.time() - t),
        }
        print(json.dumps(rec), flush=True)
        with open("results.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
