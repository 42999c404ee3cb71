"""Client code written the way Pyro's own examples write it, on 8x8 digits (and, for the
DMM, on binary sequences).

Four pairs, each with the structure of one of Pyro's examples (written here, not copied):

- :class:`VAE` (Pyro's VAE example): ``Encoder``/``Decoder`` ``nn.Module``s, ``model`` and
  ``guide`` methods, each registering its own network with ``pyro.module``, a data plate sized
  by the batch, images flattened with ``reshape(-1, x_dim)``.
- :class:`CVAE` (Pyro's CVAE example, quadrant completion): a deterministic baseline network,
  a prior network fed with the baseline's prediction, a recognition network and a generation
  network; *every* network registered in the model (``pyro.module("generation_net", self)``)
  and none in the guide; an unsized ``pyro.plate("data")``; the pixels to predict picked with
  boolean masks (which cannot be vectorised over particles).
- :class:`SSVAE` (Pyro's semi-supervised M2, here supervised): z ~ N(0, I), the label y
  observed through a one-hot categorical, x ~ Bernoulli(decoder([z, y])); the guide
  q(z | x, y); networks fed with lists of inputs concatenated on the last dim (which cannot be
  vectorised over particles either); every network registered in the model; unsized plate.
- :class:`DMM` (Pyro's deep Markov model, Krishnan et al. 2017): a gated transition
  p(z_t | z_{t-1}), a Bernoulli emitter p(x_t | z_t), and a guide q(z_t | z_{t-1}, h_t) that
  combines the previous latent with a backward RNN's state; the datapoints (sequences) in a
  plate named ``"z_minibatch"``, time steps in ``pyro.markov``, padding masked, the latents
  under ``poutine.scale(annealing_factor)``; the model's arguments are the example's
  ``(mini_batch, mini_batch_reversed, mini_batch_mask, mini_batch_seq_lengths)``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from torch import nn

X_DIM = 64  # 8x8 digits, flattened


def digits(n_train: int = 300, n_valid: int = 100):
    """Statically binarised 8x8 digits and their labels: ``(train, valid, train_labels,
    valid_labels)``, images ``(n, 64)`` in {0, 1}, labels ``(n,)`` in 0..9."""
    import pvae

    data = pvae.data.load("digits", seed=0, binarize="static")
    return (
        data.train[:n_train],
        data.valid[:n_valid],
        data.train_labels[:n_train],
        data.valid_labels[:n_valid],
    )


# ---- Pyro's VAE example ---------------------------------------------------------------------


class Encoder(nn.Module):
    def __init__(self, z_dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(X_DIM, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, z_dim)
        self.fc22 = nn.Linear(hidden_dim, z_dim)
        self.softplus = nn.Softplus()

    def forward(self, x):
        x = x.reshape(-1, X_DIM)
        hidden = self.softplus(self.fc1(x))
        return self.fc21(hidden), torch.exp(self.fc22(hidden))


class Decoder(nn.Module):
    def __init__(self, z_dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(z_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, X_DIM)
        self.softplus = nn.Softplus()
        self.sigmoid = nn.Sigmoid()

    def forward(self, z):
        hidden = self.softplus(self.fc1(z))
        return self.sigmoid(self.fc21(hidden))


class VAE(nn.Module):
    def __init__(self, z_dim: int = 4, hidden_dim: int = 32):
        super().__init__()
        self.encoder = Encoder(z_dim, hidden_dim)
        self.decoder = Decoder(z_dim, hidden_dim)
        self.z_dim = z_dim

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], self.z_dim)))
            z_scale = x.new_ones(torch.Size((x.shape[0], self.z_dim)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc_img = self.decoder(z)
            pyro.sample(
                "obs",
                dist.Bernoulli(loc_img, validate_args=False).to_event(1),
                obs=x.reshape(-1, X_DIM),
            )

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = self.encoder(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))


# ---- Pyro's CVAE example --------------------------------------------------------------------


def quadrants(images: torch.Tensor, num_inputs: int = 1):
    """Split images ``(n, 64)`` into inputs (the first ``num_inputs`` quadrants shown, the rest
    -1) and outputs (the other quadrants, the shown ones -1), as Pyro's CVAE example does."""
    grid = images.reshape(-1, 8, 8)
    shown = torch.zeros(8, 8, dtype=torch.bool)
    corners = [(slice(0, 4), slice(0, 4)), (slice(0, 4), slice(4, 8)), (slice(4, 8), slice(0, 4))]
    for rows, cols in corners[:num_inputs]:
        shown[rows, cols] = True
    xs = torch.where(shown, grid, -torch.ones(()))
    ys = torch.where(shown, -torch.ones(()), grid)
    return xs.reshape(-1, X_DIM), ys.reshape(-1, X_DIM)


class BaselineNet(nn.Module):
    """A deterministic network predicting the hidden quadrants from the shown ones."""

    def __init__(self, hidden_1: int, hidden_2: int):
        super().__init__()
        self.fc1 = nn.Linear(X_DIM, hidden_1)
        self.fc2 = nn.Linear(hidden_1, hidden_2)
        self.fc3 = nn.Linear(hidden_2, X_DIM)
        self.relu = nn.ReLU()

    def forward(self, x):
        hidden = self.relu(self.fc1(x.view(-1, X_DIM)))
        hidden = self.relu(self.fc2(hidden))
        return torch.sigmoid(self.fc3(hidden))


def train_baseline(xs, ys, hidden_1=32, hidden_2=32, steps=50, seed=0) -> BaselineNet:
    """Pre-train the baseline (the example's first stage) with a masked cross-entropy."""
    torch.manual_seed(seed)
    net = BaselineNet(hidden_1, hidden_2)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    hidden = ys != -1
    for _ in range(steps):
        loss = nn.functional.binary_cross_entropy(net(xs)[hidden], ys[hidden])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net


class MaskedEncoder(nn.Module):
    """q(z | x, y) and p(z | x, y_hat): the input quadrants and the (true or predicted) output
    quadrants put together into one image."""

    def __init__(self, z_dim: int, hidden_1: int, hidden_2: int):
        super().__init__()
        self.fc1 = nn.Linear(X_DIM, hidden_1)
        self.fc2 = nn.Linear(hidden_1, hidden_2)
        self.fc31 = nn.Linear(hidden_2, z_dim)
        self.fc32 = nn.Linear(hidden_2, z_dim)
        self.relu = nn.ReLU()

    def forward(self, x, y):
        xc = x.clone()
        xc[x == -1] = y[x == -1]
        xc = xc.view(-1, X_DIM)
        hidden = self.relu(self.fc1(xc))
        hidden = self.relu(self.fc2(hidden))
        return self.fc31(hidden), torch.exp(self.fc32(hidden))


class GenerationNet(nn.Module):
    def __init__(self, z_dim: int, hidden_1: int, hidden_2: int):
        super().__init__()
        self.fc1 = nn.Linear(z_dim, hidden_1)
        self.fc2 = nn.Linear(hidden_1, hidden_2)
        self.fc3 = nn.Linear(hidden_2, X_DIM)
        self.relu = nn.ReLU()

    def forward(self, z):
        hidden = self.relu(self.fc1(z))
        hidden = self.relu(self.fc2(hidden))
        return torch.sigmoid(self.fc3(hidden))


class CVAE(nn.Module):
    def __init__(self, z_dim=4, hidden_1=32, hidden_2=32, pre_trained_baseline_net=None):
        super().__init__()
        self.baseline_net = pre_trained_baseline_net
        self.prior_net = MaskedEncoder(z_dim, hidden_1, hidden_2)
        self.generation_net = GenerationNet(z_dim, hidden_1, hidden_2)
        self.recognition_net = MaskedEncoder(z_dim, hidden_1, hidden_2)

    def model(self, xs, ys=None):
        # every network, the recognition network included, registered with Pyro here
        pyro.module("generation_net", self)
        batch_size = xs.shape[0]
        with pyro.plate("data"):
            with torch.no_grad():  # the prior network starts from the baseline's guess
                y_hat = self.baseline_net(xs).view(xs.shape)
            prior_loc, prior_scale = self.prior_net(xs, y_hat)
            zs = pyro.sample("z", dist.Normal(prior_loc, prior_scale).to_event(1))
            loc = self.generation_net(zs)
            if ys is not None:
                # only the hidden quadrants are scored
                mask_loc = loc[(xs == -1).view(-1, X_DIM)].view(batch_size, -1)
                mask_ys = ys[xs == -1].view(batch_size, -1)
                pyro.sample(
                    "y",
                    dist.Bernoulli(mask_loc, validate_args=False).to_event(1),
                    obs=mask_ys,
                )
            else:
                pyro.deterministic("y", loc.detach())
            return loc

    def guide(self, xs, ys=None):
        with pyro.plate("data"):
            if ys is None:
                y_hat = self.baseline_net(xs).view(xs.shape)
                loc, scale = self.prior_net(xs, y_hat)
            else:
                loc, scale = self.recognition_net(xs, ys)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


# ---- Pyro's SS-VAE (M2), supervised --------------------------------------------------------


class ConcatMLP(nn.Module):
    """An MLP on a list of inputs concatenated on the last dim; ``heads`` output layers."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, heads: int = 1):
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(in_dim, hidden), nn.Softplus())
        self.heads = nn.ModuleList(nn.Linear(hidden, out_dim) for _ in range(heads))

    def forward(self, inputs):
        hidden = self.hidden(torch.cat(inputs, -1))
        outputs = [head(hidden) for head in self.heads]
        return outputs[0] if len(outputs) == 1 else outputs


class SSVAE(nn.Module):
    def __init__(self, output_size=10, z_dim=4, hidden=32):
        super().__init__()
        self.output_size, self.z_dim = output_size, z_dim
        self.encoder_y = ConcatMLP(X_DIM, hidden, output_size)  # unused when y is observed
        self.encoder_z = ConcatMLP(X_DIM + output_size, hidden, z_dim, heads=2)
        self.decoder = ConcatMLP(z_dim + output_size, hidden, X_DIM)

    def model(self, xs, ys=None):
        pyro.module("ss_vae", self)
        batch_size = xs.size(0)
        options = dict(dtype=xs.dtype, device=xs.device)
        with pyro.plate("data"):
            prior_loc = torch.zeros(batch_size, self.z_dim, **options)
            prior_scale = torch.ones(batch_size, self.z_dim, **options)
            zs = pyro.sample("z", dist.Normal(prior_loc, prior_scale).to_event(1))
            alpha_prior = torch.ones(batch_size, self.output_size, **options) / self.output_size
            ys = pyro.sample("y", dist.OneHotCategorical(alpha_prior), obs=ys)
            loc = torch.sigmoid(self.decoder([zs, ys]))
            pyro.sample("x", dist.Bernoulli(loc, validate_args=False).to_event(1), obs=xs)
            return loc

    def guide(self, xs, ys=None):
        with pyro.plate("data"):
            if ys is None:
                alpha = torch.softmax(self.encoder_y([xs]), -1)
                ys = pyro.sample("y", dist.OneHotCategorical(alpha))
            loc, raw_scale = self.encoder_z([xs, ys])
            pyro.sample("z", dist.Normal(loc, torch.exp(raw_scale)).to_event(1))


# ---- Pyro's deep Markov model ------------------------------------------------------------------


def reverse_sequences(mini_batch: torch.Tensor, seq_lengths: torch.Tensor) -> torch.Tensor:
    """Each sequence of ``(B, T, D)`` reversed in time within its own length (padding stays
    at the end)."""
    reversed_batch = torch.zeros_like(mini_batch)
    for b, length in enumerate(seq_lengths.tolist()):
        reversed_batch[b, :length] = mini_batch[b, :length].flip(0)
    return reversed_batch


def pad_and_reverse(rnn_output: torch.Tensor, seq_lengths: torch.Tensor) -> torch.Tensor:
    """The RNN's outputs on the reversed sequences put back in forward time."""
    return reverse_sequences(rnn_output, seq_lengths)


def sequences(n: int = 96, t_max: int = 6, dim: int = 8, seed: int = 0):
    """Binary sequences with a persistent pattern (each step keeps the previous one's notes
    with probability 0.9), lengths 3..t_max, padded with zeros: the DMM's four arguments
    ``(mini_batch, mini_batch_reversed, mini_batch_mask, mini_batch_seq_lengths)`` as one
    tuple of tensors sharing their first dimension."""
    generator = torch.Generator().manual_seed(seed)
    notes = torch.zeros(n, t_max, dim)
    notes[:, 0] = (torch.rand(n, dim, generator=generator) < 0.3).float()
    for t in range(1, t_max):
        keep = torch.rand(n, dim, generator=generator) < 0.9
        fresh = (torch.rand(n, dim, generator=generator) < 0.3).float()
        notes[:, t] = torch.where(keep, notes[:, t - 1], fresh)
    lengths = torch.randint(3, t_max + 1, (n,), generator=generator)
    mask = (torch.arange(t_max)[None, :] < lengths[:, None]).float()
    notes = notes * mask[:, :, None]
    return notes, reverse_sequences(notes, lengths), mask, lengths


class Emitter(nn.Module):
    """p(x_t | z_t): Bernoulli probabilities from a two-layer network."""

    def __init__(self, input_dim: int, z_dim: int, emission_dim: int):
        super().__init__()
        self.lin_z_to_hidden = nn.Linear(z_dim, emission_dim)
        self.lin_hidden_to_hidden = nn.Linear(emission_dim, emission_dim)
        self.lin_hidden_to_input = nn.Linear(emission_dim, input_dim)
        self.relu = nn.ReLU()

    def forward(self, z_t):
        h1 = self.relu(self.lin_z_to_hidden(z_t))
        h2 = self.relu(self.lin_hidden_to_hidden(h1))
        return torch.sigmoid(self.lin_hidden_to_input(h2))


class GatedTransition(nn.Module):
    """p(z_t | z_{t-1}): a gate mixes a linear and a nonlinear proposal for the mean; the
    scale is a softplus of the nonlinear proposal."""

    def __init__(self, z_dim: int, transition_dim: int):
        super().__init__()
        self.lin_gate_z_to_hidden = nn.Linear(z_dim, transition_dim)
        self.lin_gate_hidden_to_z = nn.Linear(transition_dim, z_dim)
        self.lin_proposed_mean_z_to_hidden = nn.Linear(z_dim, transition_dim)
        self.lin_proposed_mean_hidden_to_z = nn.Linear(transition_dim, z_dim)
        self.lin_sig = nn.Linear(z_dim, z_dim)
        self.lin_z_to_loc = nn.Linear(z_dim, z_dim)
        with torch.no_grad():  # the linear path starts as the identity
            self.lin_z_to_loc.weight.copy_(torch.eye(z_dim))
            self.lin_z_to_loc.bias.zero_()
        self.relu = nn.ReLU()
        self.softplus = nn.Softplus()

    def forward(self, z_t_1):
        gate = torch.sigmoid(self.lin_gate_hidden_to_z(self.relu(self.lin_gate_z_to_hidden(z_t_1))))
        proposed = self.lin_proposed_mean_hidden_to_z(
            self.relu(self.lin_proposed_mean_z_to_hidden(z_t_1))
        )
        loc = (1 - gate) * self.lin_z_to_loc(z_t_1) + gate * proposed
        scale = self.softplus(self.lin_sig(self.relu(proposed)))
        return loc, scale


class Combiner(nn.Module):
    """q(z_t | z_{t-1}, h_t): the previous latent, through a tanh layer, averaged with the
    backward RNN's state h_t, then a mean and a softplus scale."""

    def __init__(self, z_dim: int, rnn_dim: int):
        super().__init__()
        self.lin_z_to_hidden = nn.Linear(z_dim, rnn_dim)
        self.lin_hidden_to_loc = nn.Linear(rnn_dim, z_dim)
        self.lin_hidden_to_scale = nn.Linear(rnn_dim, z_dim)
        self.tanh = nn.Tanh()
        self.softplus = nn.Softplus()

    def forward(self, z_t_1, h_rnn):
        h_combined = 0.5 * (self.tanh(self.lin_z_to_hidden(z_t_1)) + h_rnn)
        return self.lin_hidden_to_loc(h_combined), self.softplus(
            self.lin_hidden_to_scale(h_combined)
        )


class DMM(nn.Module):
    """The deep Markov model and its guide, in a plate named ``"z_minibatch"``."""

    def __init__(self, input_dim=8, z_dim=4, emission_dim=16, transition_dim=16, rnn_dim=16):
        super().__init__()
        self.emitter = Emitter(input_dim, z_dim, emission_dim)
        self.trans = GatedTransition(z_dim, transition_dim)
        self.combiner = Combiner(z_dim, rnn_dim)
        self.rnn = nn.RNN(
            input_size=input_dim, hidden_size=rnn_dim, nonlinearity="relu", batch_first=True
        )
        self.z_0 = nn.Parameter(torch.zeros(z_dim))
        self.z_q_0 = nn.Parameter(torch.zeros(z_dim))
        self.h_0 = nn.Parameter(torch.zeros(1, 1, rnn_dim))

    def model(
        self,
        mini_batch,
        mini_batch_reversed,
        mini_batch_mask,
        mini_batch_seq_lengths,
        annealing_factor=1.0,
    ):
        T_max = mini_batch.size(1)
        pyro.module("dmm", self)
        z_prev = self.z_0.expand(mini_batch.size(0), self.z_0.size(0))
        with pyro.plate("z_minibatch", len(mini_batch)):
            for t in pyro.markov(range(1, T_max + 1)):
                z_loc, z_scale = self.trans(z_prev)
                with poutine.scale(scale=annealing_factor):
                    z_t = pyro.sample(
                        f"z_{t}",
                        dist.Normal(z_loc, z_scale).mask(mini_batch_mask[:, t - 1 : t]).to_event(1),
                    )
                emission_probs_t = self.emitter(z_t)
                pyro.sample(
                    f"obs_x_{t}",
                    dist.Bernoulli(emission_probs_t)
                    .mask(mini_batch_mask[:, t - 1 : t])
                    .to_event(1),
                    obs=mini_batch[:, t - 1, :],
                )
                z_prev = z_t

    def guide(
        self,
        mini_batch,
        mini_batch_reversed,
        mini_batch_mask,
        mini_batch_seq_lengths,
        annealing_factor=1.0,
    ):
        T_max = mini_batch.size(1)
        pyro.module("dmm", self)
        h_0_contig = self.h_0.expand(1, mini_batch.size(0), self.rnn.hidden_size).contiguous()
        rnn_output, _ = self.rnn(mini_batch_reversed, h_0_contig)
        rnn_output = pad_and_reverse(rnn_output, mini_batch_seq_lengths)
        z_prev = self.z_q_0.expand(mini_batch.size(0), self.z_q_0.size(0))
        with pyro.plate("z_minibatch", len(mini_batch)):
            for t in pyro.markov(range(1, T_max + 1)):
                z_loc, z_scale = self.combiner(z_prev, rnn_output[:, t - 1, :])
                z_dist = dist.Normal(z_loc, z_scale)
                with pyro.poutine.scale(scale=annealing_factor):
                    z_t = pyro.sample(
                        f"z_{t}", z_dist.mask(mini_batch_mask[:, t - 1 : t]).to_event(1)
                    )
                z_prev = z_t
