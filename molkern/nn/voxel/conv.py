"""Dense steerable 3D convolution: the implicit kernel sampled on a voxel window, applied with one conv3d.

Paper section 3.5: the kernel k(x) (an ImplicitKernel fed by an EdgeEmbedding, exactly as in the point
convolution) is evaluated at the voxel-centre offsets of a K x K x K window and reshaped into a conv3d
weight. Grid convention: a field is a tensor (B, irreps.dim, X, Y, Z) (the e3nn irreps layout flattened
into channels); tensor dims 2, 3, 4 are the x, y, z axes, and voxel (i, j, k) sits at (i, j, k) * voxel_size.
"""

import copy
from typing import Optional, Union

import torch
import torch.nn.functional as F
from e3nn import o3
from torch import nn

from ... import groups as groups_lib
from ..conv import SteerableConv
from ..eager import eager_e3nn
from ..linear import Linear
from ..edges import EdgeEmbedding
from ..kernels import ImplicitKernel, kernel_matrix

_Triple = Union[int, tuple]


def _triple(value, name: str) -> tuple:
    out = tuple(value) if isinstance(value, (tuple, list)) else (value,) * 3
    if len(out) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in out):
        raise ValueError(f"{name} must be a positive int or a triple of them, got {value!r}")
    return out


def _after_mlp(kernel: ImplicitKernel) -> ImplicitKernel:
    """A shallow view of `kernel` (same tensor product and parameters) whose MLP is the identity.

    ImplicitKernel.forward starts with h = self.mlp(edges.kernel_in); given edges whose kernel_in already holds
    h, the view computes the same messages. The original kernel is left untouched (own _modules dict).
    """
    view = copy.copy(kernel)
    view._modules = dict(kernel._modules)
    view._modules["mlp"] = nn.Identity()
    return view


def window_offsets(kernel_size: int, dilation: int = 1, voxel_size: float = 1.0) -> torch.Tensor:
    """Offsets x_j - x_i of the taps of a K x K x K window, in the order of conv3d's weight[..., a, b, c].

    conv3d is a cross-correlation: out[p] = sum_q w[q] in[p + (q - K // 2) * dilation] (with "same" padding),
    so tap (a, b, c) reads the voxel at offset ((a, b, c) - K // 2) * dilation from the output voxel.

    Shapes:
        -> (K**3, 3) in units of voxel_size, C order over (a, b, c) = (x, y, z)
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer (taps on voxel centres), got {kernel_size}")
    r = torch.arange(kernel_size, dtype=torch.float64) - kernel_size // 2
    grid = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)
    return grid * (dilation * voxel_size)


class DenseSteerableConv3d(nn.Module):
    """G-steerable 3D convolution on voxel grids with an implicit kernel (one torch conv3d per forward).

    The weight is w[o, c, a, b, c'] = s_o * K(x_q)[o, c] for the taps x_q of `window_offsets`, where K is
    `kernel_matrix` of an ImplicitKernel (optionally followed by an e3nn Linear folded into it, for the
    factorised form) and s_o a per-output-field constant fixed at initialisation so that white-noise inputs
    of unit variance give outputs of unit variance (the sum of squared weights of every output row is 1 on
    average over each field). The kernel's smooth radial envelope (PolynomialCutoff) vanishes at `cutoff`,
    by default the window's half-width K * dilation * voxel_size / 2, so the support is a ball inside the
    window and the sampled kernel has no cube-shaped truncation.

    The weight is re-sampled at every forward in training mode (so gradients reach the kernel MLP) and
    cached in eval mode until a parameter or buffer changes (detected through tensor versions) or the
    attributes change; in eval mode no gradient flows into the kernel parameters (inputs still get them).

    Equivariance: exact for the symmetries of the grid that lie in G (the 48 cube symmetries for O(3), the
    90-degree rotations about z for SO(2) about z) with stride 1 and symmetric padding; approximate, with a
    discretisation error that shrinks as the grid gets finer, for other rotations in G.

    Args:
        irreps_in, irreps_out: e3nn irreps of the input and output fields.
        kernel_size: K, odd (taps on voxel centres).
        group: a molkern.groups.Group or a name for molkern.groups.get (None: O(3)).
        stride, padding, dilation: as in torch.nn.functional.conv3d (padding default: K // 2 * dilation,
            i.e. "same" for stride 1; an int, a triple, "same" or "valid").
        voxel_size: edge length of a voxel (the length unit of `cutoff`, e.g. Angstrom; default 1 = voxels).
        cutoff: radius of the kernel's support (default K * dilation * voxel_size / 2); at most
            (K // 2 + 1) * dilation * voxel_size, so that no tap outside the window would be non-zero.
        irreps_attr: steerable attributes shared by the whole layer fed to the kernel (e.g. "1x1o" a direction).
        form: "full" (paper-exact) or "factorised" ImplicitKernel.
        num_radial: Bessel functions of |x|. mlp_width, mlp_layers: the kernel MLP.
        bias: learnable bias on the 0e output channels (the only equivariant bias).

    Shapes:
        x: (B, irreps_in.dim, X, Y, Z), attrs: (irreps_attr.dim,) -> (B, irreps_out.dim, X', Y', Z')
    """

    @eager_e3nn
    def __init__(
        self,
        irreps_in: o3.Irreps,
        irreps_out: o3.Irreps,
        kernel_size: int = 5,
        group=None,
        stride: _Triple = 1,
        padding: Union[None, str, _Triple] = None,
        dilation: int = 1,
        voxel_size: float = 1.0,
        cutoff: Optional[float] = None,
        irreps_attr: o3.Irreps = "",
        form: str = "full",
        num_radial: int = 4,
        mlp_width: int = 8,
        mlp_layers: int = 2,
        bias: bool = True,
    ):
        super().__init__()
        self.irreps_in = o3.Irreps(irreps_in)
        self.irreps_out = o3.Irreps(irreps_out)
        if self.irreps_in.dim == 0 or self.irreps_out.dim == 0:
            raise ValueError(f"irreps_in and irreps_out must be non-empty, got {self.irreps_in!r}, {self.irreps_out!r}")
        if not isinstance(dilation, int) or isinstance(dilation, bool) or dilation < 1:
            raise ValueError(f"dilation must be a positive int (the same along x, y, z), got {dilation!r}")
        if voxel_size <= 0:
            raise ValueError(f"voxel_size must be positive, got {voxel_size}")
        self.kernel_size = int(kernel_size)
        self.register_buffer(
            "offsets", window_offsets(self.kernel_size, dilation, voxel_size).to(torch.get_default_dtype())
        )  # (K^3, 3)
        self.stride = _triple(stride, "stride")
        self.dilation = dilation
        self.voxel_size = float(voxel_size)
        half = self.kernel_size // 2
        if padding is None:
            padding = half * dilation
        if isinstance(padding, int):
            padding = (padding,) * 3
        if not isinstance(padding, str) and (len(padding) != 3 or any(int(p) != p or p < 0 for p in padding)):
            raise ValueError(f"padding must be a non-negative int, a triple, 'same' or 'valid', got {padding!r}")
        self.padding = padding if isinstance(padding, str) else tuple(int(p) for p in padding)
        max_cutoff = (half + 1) * dilation * voxel_size
        self.cutoff = float(cutoff) if cutoff is not None else self.kernel_size * dilation * voxel_size / 2
        if not 0 < self.cutoff <= max_cutoff + 1e-12:
            raise ValueError(
                f"cutoff must lie in (0, {max_cutoff:g}] for kernel_size {self.kernel_size}, dilation {dilation} and "
                f"voxel_size {voxel_size:g} (taps outside the window would be non-zero), got {cutoff}"
            )
        # taps at or beyond the cutoff have a zero envelope, hence an exactly zero kernel: sample only the others
        support = torch.nonzero(self.offsets.norm(dim=-1) < self.cutoff).flatten()
        self.register_buffer("_support", support, persistent=False)  # (T,) tap indices inside the ball
        self.group = groups_lib.get(group) if isinstance(group, str) else group
        self.irreps_attr = o3.Irreps(irreps_attr)
        lmax = max(ir.l for _, ir in self.irreps_in) + max(ir.l for _, ir in self.irreps_out)
        # the offsets are fixed: batch-normalising their harmonics would only add a train/eval mismatch
        self.edge_embedding = EdgeEmbedding(
            self.cutoff, lmax, num_radial, self.group, irreps_edge_attr=self.irreps_attr, batch_norm=False
        )
        self.kernel = ImplicitKernel(
            self.irreps_in, self.irreps_out, self.edge_embedding.irreps_kernel_in, form, mlp_width, mlp_layers
        )
        # the factorised kernel's outputs follow irreps_in: an e3nn Linear (folded into the weight) maps them
        self.mix = Linear(self.kernel.irreps_out, self.irreps_out) if self.kernel.irreps_out != self.irreps_out else None

        scalar = [i for (mul, ir), sl in zip(self.irreps_out, self.irreps_out.slices()) if ir == o3.Irrep("0e")
                  for i in range(sl.start, sl.stop)]
        self.register_buffer("_bias_index", torch.tensor(scalar, dtype=torch.long), persistent=False)
        self.bias = nn.Parameter(torch.zeros(len(scalar))) if bias and scalar else None
        self.register_buffer("weight_scale", torch.ones(self.irreps_out.dim))
        self._cache = None
        self._init_scale()

    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _init_scale(self) -> None:
        """Set weight_scale so each output field has unit mean (over its rows) sum of squared weights."""
        gen = torch.Generator().manual_seed(0)
        attrs = torch.randn(self.irreps_attr.dim, generator=gen, dtype=self.offsets.dtype)
        w = self._sample(attrs if self.irreps_attr.dim else None).flatten(1)  # (d_out, d_in * K^3)
        row_sq = w.pow(2).sum(1)  # (d_out,)
        scale = torch.ones_like(row_sq)
        for (mul, ir), sl in zip(self.irreps_out, self.irreps_out.slices()):
            fields = row_sq[sl].view(mul, ir.dim).mean(1)  # (mul,)
            s = torch.where(fields > 1e-20, fields.clamp_min(1e-20).rsqrt(), torch.ones_like(fields))
            scale[sl] = s.repeat_interleave(ir.dim)
        self.weight_scale.copy_(scale)

    def _check_attrs(self, attrs: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if self.irreps_attr.dim == 0:
            if attrs is not None:
                raise ValueError("this layer was built without irreps_attr: pass attrs=None")
            return None
        if attrs is None or attrs.shape != (self.irreps_attr.dim,):
            raise ValueError(
                f"attrs must have shape ({self.irreps_attr.dim},) for irreps_attr {self.irreps_attr} (shared by the "
                f"whole layer), got {None if attrs is None else tuple(attrs.shape)}"
            )
        return attrs

    def _sample(self, attrs: Optional[torch.Tensor]) -> torch.Tensor:
        """Unscaled weight (d_out, d_in, K, K, K): the kernel matrix at every tap."""
        offsets = self.offsets[self._support]  # (T, 3)
        edge_attrs = None if attrs is None else attrs.to(offsets.dtype).expand(offsets.shape[0], -1)  # (T, attr_dim)
        edges = self.edge_embedding(offsets, edge_attrs)
        # kernel_matrix applies the kernel to the d_in basis vectors of rho_in, repeating every edge d_in times;
        # run the kernel MLP once per tap instead and hand kernel_matrix the same kernel with its MLP done
        edges = edges._replace(kernel_in=self.kernel.mlp(edges.kernel_in), kernel_in_parts=None)  # (T, MLP out dim)
        mat = kernel_matrix(_after_mlp(self.kernel), edges)  # (T, kernel.irreps_out.dim, d_in)
        if self.mix is not None:
            eye = torch.eye(self.kernel.irreps_out.dim, dtype=mat.dtype, device=mat.device)
            mat = torch.einsum("om,emi->eoi", self.mix(eye).T, mat)  # (T, d_out, d_in)
        k = self.kernel_size
        full = mat.new_zeros(k**3, self.irreps_out.dim, self.irreps_in.dim)  # (K^3, d_out, d_in)
        full = full.index_copy(0, self._support, mat)
        return full.permute(1, 2, 0).reshape(self.irreps_out.dim, self.irreps_in.dim, k, k, k)

    def _state_key(self, attrs):
        tensors = list(self.parameters()) + list(self.buffers())
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors), attrs

    def weight(self, attrs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The conv3d weight (irreps_out.dim, irreps_in.dim, K, K, K) (cached in eval mode)."""
        attrs = self._check_attrs(attrs)
        if self.training:
            self._cache = None
            return self._sample(attrs) * self.weight_scale.view(-1, 1, 1, 1, 1)
        key, cached_attrs = self._state_key(attrs)
        if self._cache is not None:
            old_key, old_attrs, w = self._cache
            same_attrs = (attrs is None and old_attrs is None) or (
                attrs is not None and old_attrs is not None and torch.equal(attrs, old_attrs)
            )
            if old_key == key and same_attrs:
                return w
        with torch.no_grad():
            w = self._sample(attrs) * self.weight_scale.view(-1, 1, 1, 1, 1)
        self._cache = (key, None if attrs is None else attrs.detach().clone(), w)
        return w

    def full_bias(self) -> Optional[torch.Tensor]:
        """Bias of every output channel (irreps_out.dim,): the learnable one on 0e channels, 0 elsewhere."""
        if self.bias is None:
            return None
        return self.bias.new_zeros(self.irreps_out.dim).index_copy(0, self._bias_index, self.bias)

    def forward(self, x: torch.Tensor, attrs: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != self.irreps_in.dim:
            raise ValueError(
                f"x must have shape (B, {self.irreps_in.dim}, X, Y, Z) for irreps_in {self.irreps_in}, got {tuple(x.shape)}"
            )
        w = self.weight(attrs).to(x.dtype)  # (d_out, d_in, K, K, K)
        return F.conv3d(x, w, self.full_bias(), self.stride, self.padding, self.dilation)  # (B, d_out, X', Y', Z')

    def forward_points(
        self, node_feats: torch.Tensor, pos: torch.Tensor, edge_index: torch.Tensor, attrs: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The same layer as a point convolution (SteerableConv with the same kernel, scale and bias).

        On voxel centres with an edge for every tap of the window this equals `forward` (zero padding =
        missing neighbours); use it to evaluate the layer off the grid.

        Shapes:
            node_feats: (N, irreps_in.dim), pos: (N, 3) in units of voxel_size, edge_index: (2, E)
            [source j, target i] -> (N, irreps_out.dim)
        """
        attrs = self._check_attrs(attrs)
        edge_vec = pos.index_select(0, edge_index[0]) - pos.index_select(0, edge_index[1])  # (E, 3)
        edge_attrs = None if attrs is None else attrs.to(pos.dtype).expand(edge_vec.shape[0], -1)  # (E, attr_dim)
        edges = self.edge_embedding(edge_vec, edge_attrs)
        out = SteerableConv(self.kernel)(node_feats, edges, edge_index)  # (N, kernel.irreps_out.dim)
        if self.mix is not None:
            out = self.mix(out)  # (N, d_out)
        out = out * self.weight_scale
        b = self.full_bias()
        return out if b is None else out + b

    def extra_repr(self) -> str:
        return (
            f"{self.irreps_in} -> {self.irreps_out}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, cutoff={self.cutoff:g}, group={self.group!r}"
        )
