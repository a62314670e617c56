"""Edge geometry, computed once per forward pass and shared by every layer's kernel."""

from typing import List, NamedTuple, Optional, Tuple

import torch
from e3nn import o3
from torch import nn

from .mlp import BatchNorm, EquivariantMLP, filter_irreps, irreps_up_to, reachable_irreps
from .radial import BesselBasis, PolynomialCutoff
from .constants import cached, parameters_constant
from .eager import eager_e3nn
from .fused import extension
from .harmonics import harmonics_module, spherical_harmonics


class Edges(NamedTuple):
    """Per-edge tensors given to every kernel.

    Attributes:
        vec: (E, 3) relative position x_j - x_i in Angstrom (source minus target).
        length: (E,) |x_j - x_i| in Angstrom.
        envelope: (E, 1) smooth cutoff u(|x|), 0 at the cutoff.
        radial: (E, num_radial) Bessel radial basis.
        sh: (E, irreps_sh.dim) spherical harmonics of the direction, l = 0..lmax ("component" normalised),
            for standard kernels; None when the embedding builds `kernel_in` (implicit kernels do not use it).
        kernel_in: (E, irreps_kernel_in.dim) input of the implicit kernels' heads (the front features, or the
            output of the shared MLP trunk when there is one), or None.
        kernel_in_parts: with an "invariant" trunk, kernel_in's invariant block (E, trunk_width) and its other
            columns (E, rest) as separate tensors (the same values; a head that reads them apart spares kernel_in
            the split, and its gradient the concatenation), else None.
    """

    vec: torch.Tensor
    length: torch.Tensor
    envelope: torch.Tensor
    radial: torch.Tensor
    sh: Optional[torch.Tensor]
    kernel_in: Optional[torch.Tensor]
    kernel_in_parts: Optional[Tuple[torch.Tensor, torch.Tensor]] = None


def _split_scalars(irreps: o3.Irreps):
    irreps = o3.Irreps(irreps)
    is_scalar = [ir.l == 0 and ir.p == 1 for _, ir in irreps]
    return (
        o3.Irreps([mi for mi, s in zip(irreps, is_scalar) if s]),
        o3.Irreps([mi for mi, s in zip(irreps, is_scalar) if not s]),
        is_scalar,
    )


def _cat(parts: List[torch.Tensor]) -> torch.Tensor:
    """Concatenation along the last dimension; a single part as it is."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _take(x: torch.Tensor, irreps: o3.Irreps, mask) -> List[torch.Tensor]:
    """Columns of x (laid out as irreps) of the entries where mask is True: [x] if all, [] if none."""
    if all(mask):
        return [x]
    parts = [x[..., s] for s, keep in zip(irreps.slices(), mask) if keep]
    return [torch.cat(parts, dim=-1)] if parts else []


class EdgeEmbedding(nn.Module):
    """The geometric front of the kernels: radial basis, harmonics, references and attribute products.

    The implicit kernel's MLP input (`kernel_in`) is the direct sum of
      * the radial basis of |x| (num_radial x 0e) and the scalar attributes (edge z_ij, source z_j, target z_i),
      * the harmonic polynomials of x / cutoff, l = 1..max(lmax, largest l of the references and
        attributes), batch-normalised (e3nn BatchNorm),
      * the group's reference tensors and the non-scalar attributes ("vector inputs" V),
      * the products V (x) [harmonics, attribute vectors] up to l = lmax (no weights; the references
        squared would be constants), so that the MLP sees invariants
        such as x . a for the axis a of SO(2), which linear layers and gates alone cannot form.

    Args:
        cutoff: radial cutoff in Angstrom.
        lmax: band limit of the harmonics and products (use l_in + l_out of the convolutions).
        num_radial: number of Bessel functions.
        group: a molkern.groups.Group (None: O(3)).
        irreps_edge_attr: irreps of per-edge attributes z_ij (e.g. "4x0e" bond one-hot).
        irreps_node_attr: irreps of per-node attributes z_i fed to the kernel at both ends (e.g. "5x0e").
        batch_norm: batch-normalise the harmonic polynomials.
        kernel_input: build `kernel_in` (set False when only standard kernels are used).
        trunk_width, trunk_layers: an optional MLP trunk run once per forward on the front features and shared
            by the kernels of all layers, each of which keeps only a small head of its own. 0 layers: no trunk.
        trunk_type: "gated": an e3nn gated MLP (trunk_width copies of every irrep type up to l = lmax that the
            front contains); "invariant": an MLP of trunk_width units on the front's invariants (0e) only, the
            front's other irreps passed on unchanged, for heads that weight them by functions of the invariants
            (`InvariantWeightedLinear`: together an equivariant MLP of the gated MLPs' function class, on far
            narrower per-edge tensors).

    Shapes:
        edge_vec: (E, 3), edge_attrs: (E, irreps_edge_attr.dim), node_attrs: (N, irreps_node_attr.dim),
        edge_index: (2, E) -> Edges
    """

    @eager_e3nn
    def __init__(
        self,
        cutoff: float,
        lmax: int,
        num_radial: int = 8,
        group=None,
        irreps_edge_attr: o3.Irreps = "",
        irreps_node_attr: o3.Irreps = "",
        batch_norm: bool = True,
        kernel_input: bool = True,
        trunk_width: int = 8,
        trunk_layers: int = 0,
        trunk_type: str = "gated",
    ):
        super().__init__()
        self.cutoff = float(cutoff)
        self.lmax = int(lmax)
        self.group = group
        self.irreps_edge_attr = o3.Irreps(irreps_edge_attr)
        self.irreps_node_attr = o3.Irreps(irreps_node_attr)
        self.irreps_sh = o3.Irreps.spherical_harmonics(self.lmax)
        self.radial = BesselBasis(cutoff, num_radial)
        self.envelope = PolynomialCutoff(cutoff)
        self.kernel_input = kernel_input

        edge_s, edge_v, self._edge_mask = _split_scalars(self.irreps_edge_attr)
        node_s, node_v, self._node_mask = _split_scalars(self.irreps_node_attr)
        self._edge_vector_mask = [not m for m in self._edge_mask]
        self._node_vector_mask = [not m for m in self._node_mask]
        irreps_ref = o3.Irreps(group.irreps_ref) if group is not None else o3.Irreps("")
        refs = group.references.to(torch.float64).clone() if group is not None else torch.zeros(0)
        for sl in irreps_ref.slices():  # unit RMS per irrep: scale does not change the stabiliser
            norm = refs[sl].pow(2).mean().sqrt()
            refs[sl] = refs[sl] / norm if norm > 0 else refs[sl]
        self.register_buffer("references", refs.to(torch.get_default_dtype()))
        self.irreps_ref = irreps_ref

        # harmonics reach the references' degree too, so that e.g. Re((x+iy)^4) . Y_4(x) gives C_4 invariants
        lmax_vectors = max([ir.l for _, ir in irreps_ref + edge_v + node_v], default=0)
        self.irreps_harmonics = o3.Irreps.spherical_harmonics(max(self.lmax, lmax_vectors))[1:]  # l >= 1
        scale = [((2 * ir.l + 3) / 3) ** 0.5 for _, ir in self.irreps_harmonics for _ in range(ir.dim)]
        self.register_buffer("harmonics_scale", torch.tensor(scale, dtype=torch.get_default_dtype()))
        self.harmonics_norm = BatchNorm(self.irreps_harmonics) if batch_norm and self.lmax > 0 else None
        self.irreps_scalars = o3.Irreps(f"{num_radial}x0e") + edge_s + node_s + node_s
        self.irreps_vectors = irreps_ref + edge_v + node_v + node_v
        keep = [ir for _, ir in o3.Irreps.spherical_harmonics(self.lmax) for ir in (ir, o3.Irrep(ir.l, -ir.p))]
        self._num_ref = irreps_ref.dim
        if self.irreps_vectors.dim > 0:  # V (x) [harmonics, attribute vectors]: references squared are constants
            self.products = o3.FullTensorProduct(
                self.irreps_vectors, self.irreps_harmonics + edge_v + node_v + node_v, filter_ir_out=keep
            )
            irreps_products = self.products.irreps_out
        else:
            self.products = None
            irreps_products = o3.Irreps("")
        # sort the concatenation by irrep so the kernel MLP's first Linear sees few, wide blocks
        irreps_cat = self.irreps_scalars + self.irreps_harmonics + self.irreps_vectors + irreps_products
        irreps_sorted, _, inv = irreps_cat.sort()  # inv[k]: the entry of irreps_cat at sorted position k
        slices = irreps_cat.slices()
        columns = [c for i in inv for c in range(slices[i].start, slices[i].stop)]
        sort = None if columns == list(range(len(columns))) else torch.tensor(columns, dtype=torch.long)
        self.register_buffer("_sort_columns", sort, persistent=False)  # None: already sorted
        self.irreps_front = irreps_sorted.simplify()
        if trunk_type not in ("gated", "invariant"):
            raise ValueError(f"trunk_type must be 'gated' or 'invariant', got {trunk_type!r}")
        self.trunk, self.trunk_type = None, trunk_type
        self.irreps_kernel_in = self.irreps_front
        if trunk_layers > 0 and trunk_type == "gated":
            # only irrep types present in the front can be non-zero (Linear and Gate keep types)
            hidden = filter_irreps(irreps_up_to(trunk_width, self.lmax, "both"), reachable_irreps(self.irreps_front))
            self.trunk = EquivariantMLP(self.irreps_front, hidden, None, trunk_layers)
            self.irreps_kernel_in = self.trunk.irreps_out
        elif trunk_layers > 0:
            # the front is sorted and simplified: its invariants are one block (radial basis and attributes first)
            blocks = [ir for _, ir in self.irreps_front]
            self._front_sizes = [mul_ir.dim for mul_ir in self.irreps_front]
            self._front_scalar = blocks.index(o3.Irrep("0e"))
            # the front in cat order with exactly the scalar parts as its 0e block, first: no split needed
            self._scalars_apart = sort is None and self._front_scalar == 0 and \
                self.irreps_front[0].dim == self.irreps_scalars.dim
            sizes = [self.irreps_front[self._front_scalar].dim] + [trunk_width] * trunk_layers
            layers = []
            for size_in, size_out in zip(sizes[:-1], sizes[1:]):
                layers += [nn.Linear(size_in, size_out), nn.SiLU()]
            self.trunk = nn.Sequential(*layers)
            self.irreps_kernel_in = o3.Irreps(f"{trunk_width}x0e") + o3.Irreps(
                [mul_ir for mul_ir in self.irreps_front if mul_ir.ir != o3.Irrep("0e")])

    def _norm_folded(self) -> bool:
        """Whether the eval-mode BatchNorm of the harmonics is folded into their scale (constant parameters)."""
        return self.harmonics_norm is not None and not self.harmonics_norm.training and parameters_constant()

    def _harmonics_scale(self) -> torch.Tensor:
        """Per-column factor of the harmonics: unit second moment, times the BatchNorm's when folded (in eval
        mode it multiplies each l > 0 component by a constant; its running statistics and weights are buffers
        and parameters, hence cached)."""
        if not self._norm_folded():
            return self.harmonics_scale
        norm = self.harmonics_norm
        sources = [self.harmonics_scale] + list(norm.parameters()) + list(norm.buffers())
        return cached(self, "harmonics_scale", sources, lambda: norm(self.harmonics_scale[None])[0])

    def _harmonics_module(self):
        """e3nn's o3.spherical_harmonics of edge_vec / cutoff (molkern.nn.harmonics: the same values, fewer ops)."""
        return harmonics_module(self.irreps_harmonics, normalize=False, normalization="component",
                                input_scale=1 / self.cutoff)

    def _constant_basis(self, edge_vec: torch.Tensor) -> Optional[Tuple[torch.Tensor, ...]]:
        """(length (E,), envelope (E, 1), radial (E, num_radial), scaled harmonics (E, irreps_harmonics.dim)) as
        one autograd node in C++ (constant parameters: the same values as the modules', fewer operations), or None
        where it does not apply (no compiled extension, other radial functions)."""
        ext = extension()
        if (ext is None or type(self.envelope) is not PolynomialCutoff or type(self.radial) is not BesselBasis
                or not self.envelope.cutoff == self.radial.cutoff == self.cutoff):
            return None
        harmonics = self._harmonics_module()
        coeff, columns, lower, factor = harmonics.constants(edge_vec)
        scale = self._harmonics_scale()
        scaled = cached(self, "basis_coefficients", [coeff, scale], lambda: coeff * scale.to(coeff.dtype))
        freqs = cached(self, "basis_frequencies", [self.radial.freqs], lambda: self.radial.freqs.to(edge_vec.dtype))
        return tuple(ext.edge_basis(edge_vec, freqs, scaled, columns, lower, factor, self.cutoff, self.envelope.p,
                                    harmonics.lmax))

    def forward(
        self,
        edge_vec: torch.Tensor,
        edge_attrs: Optional[torch.Tensor] = None,
        node_attrs: Optional[torch.Tensor] = None,
        edge_index: Optional[torch.Tensor] = None,
    ) -> Edges:
        num_edges = edge_vec.shape[0]
        basis = self._constant_basis(edge_vec) if self.kernel_input and parameters_constant() else None
        if basis is not None:
            length, envelope, radial, harmonics = basis
        else:
            length = torch.linalg.norm(edge_vec, dim=-1)  # (E,)
            envelope = self.envelope(length).unsqueeze(-1)  # (E, 1)
            radial = self.radial(length)  # (E, num_radial)
        if not self.kernel_input:
            sh = spherical_harmonics(self.irreps_sh, edge_vec, normalize=True, normalization="component")
            return Edges(edge_vec, length, envelope, radial, sh, None)

        scalars, vectors = [radial], []
        if self.irreps_edge_attr.dim > 0:
            if edge_attrs is None or edge_attrs.shape != (num_edges, self.irreps_edge_attr.dim):
                raise ValueError(
                    f"edge_attrs must have shape ({num_edges}, {self.irreps_edge_attr.dim}) for irreps "
                    f"{self.irreps_edge_attr}, got {None if edge_attrs is None else tuple(edge_attrs.shape)}"
                )
            scalars += _take(edge_attrs, self.irreps_edge_attr, self._edge_mask)
            vectors += _take(edge_attrs, self.irreps_edge_attr, self._edge_vector_mask)
        if self.irreps_node_attr.dim > 0:
            if node_attrs is None or edge_index is None or node_attrs.shape[-1] != self.irreps_node_attr.dim:
                raise ValueError(
                    f"node_attrs of width {self.irreps_node_attr.dim} ({self.irreps_node_attr}) and edge_index "
                    f"are required, got node_attrs {None if node_attrs is None else tuple(node_attrs.shape)}"
                )
            attrs_j = node_attrs.index_select(0, edge_index[0])  # (E, node_attr_dim) source z_j
            attrs_i = node_attrs.index_select(0, edge_index[1])  # (E, node_attr_dim) target z_i
            for attrs in (attrs_j, attrs_i):
                scalars += _take(attrs, self.irreps_node_attr, self._node_mask)
                vectors += _take(attrs, self.irreps_node_attr, self._node_vector_mask)
        if self._num_ref:
            vectors.insert(0, self.references.to(edge_vec.dtype).expand(num_edges, -1))  # (E, ref_dim)
        vectors = torch.cat(vectors, dim=-1) if self.irreps_vectors.dim else None  # (E, irreps_vectors.dim)

        if basis is None:  # |x/c|^l Y_l(x/c), scaled to unit second moment for points uniform in the cutoff ball
            harmonics = self._harmonics_module()(edge_vec) * self._harmonics_scale()  # (E, irreps_harmonics.dim)
        if self.harmonics_norm is not None and not self._norm_folded():
            harmonics = self.harmonics_norm(harmonics)
        others = [harmonics] + ([vectors] if vectors is not None else [])
        if self.products is not None:
            others.append(self.products(vectors, torch.cat([harmonics, vectors[:, self._num_ref :]], dim=-1)))
        if self.trunk is not None and self.trunk_type == "invariant" and self._scalars_apart:
            # invariants through the MLP, the rest passed on: (E, irreps_kernel_in.dim), also as two parts
            invariants = self.trunk(_cat(scalars))
            rest = _cat(others)
            return Edges(edge_vec, length, envelope, radial, None, torch.cat([invariants, rest], dim=1),
                         (invariants, rest))
        kernel_in = torch.cat(scalars + others, dim=-1)
        if self._sort_columns is not None:
            kernel_in = kernel_in.index_select(1, self._sort_columns)  # (E, irreps_front.dim)
        if self.trunk is not None and self.trunk_type == "gated":
            kernel_in = self.trunk(kernel_in)  # (E, irreps_kernel_in.dim)
        elif self.trunk is not None:  # invariants through the MLP, the rest passed on: (E, irreps_kernel_in.dim)
            parts = list(torch.split(kernel_in, self._front_sizes, dim=1))
            invariants = self.trunk(parts.pop(self._front_scalar))
            rest = _cat(parts) if parts else invariants.new_zeros(num_edges, 0)
            return Edges(edge_vec, length, envelope, radial, None, torch.cat([invariants, rest], dim=1),
                         (invariants, rest))
        return Edges(edge_vec, length, envelope, radial, None, kernel_in)
