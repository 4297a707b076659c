"""The simulated three-group structured-light rig (geometry only, no rendering).

A rig is three camera *groups* (``left``, ``middle``, ``right``) standing around the
head on a circle about the world +y axis (the head centre is the world origin, see
``docs/conventions.md``). Each group is a rigid unit of

* an **IR camera** (Brown-Conrady distortion) that sees the fringes,
* a **projector** (an inverse pinhole camera, no distortion) offset from the IR camera
  by the horizontal baseline,
* an **RGB camera** (Brown-Conrady distortion) between the two and above them,

all three aimed at the group's aim point on the face. :func:`build_rig` gives the true
rig; :func:`perturb_rig` gives the rig as its (imperfect) calibration believes it: the
reference group (``middle``) defines the world frame and is exact, the side groups are
each moved as a rigid unit by a small random error of exactly the configured size.

Geometry of one group (group frame: ``z_g`` the viewing direction from the group centre
``G`` to the aim point ``A``, ``x_g`` horizontal and pointing to the image right,
``y_g`` down)::

    A = R_y(yaw) @ (0, aim_height_mm, aim_depth_mm)
    G = A + working_distance_mm * R_y(yaw) @ (0, 0, 1)
    C_ir  = G - s * baseline_mm / 2 * x_g
    C_prj = G + s * baseline_mm / 2 * x_g            (s = -1 for groups at positive yaw, else +1)
    C_rgb = G - rgb_height_mm * y_g                      (above the group centre)

Every group is the same hardware unit rotated about +y; the group at positive yaw
(``left``) is mounted mirrored (``RigParams.projector_toward_front``) so that in both
side groups the projector stands on the side of the face's midline and the IR camera
towards the back of the head, which keeps the projector's incidence on the face
symmetric between the two sides. Every device looks at ``A`` with the world
+y axis as "up": image rows run down, columns stay horizontal, so projector columns of
constant ``x_p`` are vertical stripes and the baseline is along the projector's x axis
as the decoder assumes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from kernels._checks import as_array, as_rng
from kernels._checks import check_int as _check_int
from kernels._checks import check_number as _check_float
from kernels.camera import Camera, look_at, rotation_about_axis
from kernels.synth.seeding import derive_rng

__all__ = [
    "RigParams",
    "Group",
    "Rig",
    "build_rig",
    "perturb_rig",
    "group_pose_error",
    "rotation_angle_deg",
    "root_entropy",
]

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def _check_dist(value, name: str) -> tuple[float, ...]:
    arr = as_array(value, name, (5,), finite=True)
    return tuple(float(v) for v in arr)


@dataclass(frozen=True)
class RigParams:
    """Geometry of the simulated rig; every field is validated on construction.

    Attributes
    ----------
    width, height : int
        Size in pixels of the IR and RGB images (default 1280 x 1024). Focal lengths
        follow from the fields of view, so a smaller size (tests use 320 x 256) keeps
        the same field of view.
    ir_hfov_deg : float
        Horizontal field of view of the IR camera in degrees (default 30.0): focal length
        ``fx = fy = (width / 2) / tan(hfov / 2)`` = 2388.6 px at 1280 wide, i.e. 0.209 mm
        per pixel and a 268 x 214 mm field at the 500 mm working distance. Square
        pixels, principal point at the image centre ``((W-1)/2, (H-1)/2)``.
    ir_dist : tuple of 5 float
        IR lens distortion ``(k1, k2, p1, p2, k3)`` (default ``(-0.08, 0.10, 5e-4,
        -3e-4, 0)``: about 7 px of barrel distortion in the image corners).
    rgb_hfov_deg : float
        Horizontal field of view of the RGB camera in degrees (default 30.0, as IR).
    rgb_dist : tuple of 5 float
        RGB lens distortion (default ``(-0.06, 0.08, -4e-4, 2e-4, 0)``).
    projector_width, projector_height : int
        Projector resolution ``W_p x H_p`` in pixels (default 1280 x 800).
    projector_hfov_deg : float
        Horizontal field of view of the projector (default 44.0): ``fx_p = 1584`` px,
        0.32 mm per projector pixel and a 404 x 252 mm field at 500 mm, which covers the
        IR camera's field with margin for the depth of the head. No distortion.
    working_distance_mm : float
        Distance from the group centre to its aim point on the face surface (default
        500 mm); also the ``d0`` at which ``PhotometryParams.projector_peak`` is defined.
    baseline_mm : float
        Horizontal distance between the IR camera and the projector centres (default
        180 mm); the IR camera is on the group's image-left side, the projector on its
        image-right side.
    rgb_height_mm : float
        Height of the RGB camera above the group centre (midway between the IR camera
        and the projector) in mm (default 60).
    yaw_deg : tuple of float
        Yaw of each group about the world +y axis in degrees (default ``(60, 0, -60)``);
        positive yaw puts the group on the +x side (the subject's left).
    group_names : tuple of str
        Name of each group (default ``("left", "middle", "right")``), the subject's sides.
    aim_depth_mm : tuple of float
        Distance of each group's aim point from the yaw axis along the group's axis in
        mm (default ``(80, 100, 80)``): the middle group aims at the nose tip region
        ``(0, 0, 100)``, the side groups at the cheeks ``(+-69, 0, 40)`` so that each
        sees its side of the face from the nose to the ear.
    aim_height_mm : float
        World y of the aim points in mm (default 0: eye-to-mouth level of the head).
    reference_group : str
        The group whose stored pose is exact and defines the world frame (default
        ``"middle"``).
    calib_rot_deg : float
        Rotation error (degrees, >= 0) of each stored side-group pose (default 0.5).
    calib_trans_mm : float
        Translation error (mm, >= 0) of each stored side-group pose (default 1.0).
    projector_toward_front : bool
        Mirror the groups at positive yaw (default True) so that every side group has its
        projector on the side of the face's midline and its IR camera towards the back of
        the head. Without it the left group's projector lights the front of the face at
        grazing angles (median modulation 37 vs 62 grey levels on the right).

    Raises
    ------
    ValueError
        Naming the offending field, when a value is out of range or inconsistent.
    """

    width: int = 1280
    height: int = 1024
    ir_hfov_deg: float = 30.0
    ir_dist: tuple[float, ...] = (-0.08, 0.10, 5e-4, -3e-4, 0.0)
    rgb_hfov_deg: float = 30.0
    rgb_dist: tuple[float, ...] = (-0.06, 0.08, -4e-4, 2e-4, 0.0)
    projector_width: int = 1280
    projector_height: int = 800
    projector_hfov_deg: float = 44.0
    working_distance_mm: float = 500.0
    baseline_mm: float = 180.0
    rgb_height_mm: float = 60.0
    yaw_deg: tuple[float, ...] = (60.0, 0.0, -60.0)
    group_names: tuple[str, ...] = ("left", "middle", "right")
    aim_depth_mm: tuple[float, ...] = (80.0, 100.0, 80.0)
    aim_height_mm: float = 0.0
    reference_group: str = "middle"
    calib_rot_deg: float = 0.5
    calib_trans_mm: float = 1.0
    projector_toward_front: bool = True

    def __post_init__(self) -> None:
        s = object.__setattr__
        for name in ("width", "height", "projector_width", "projector_height"):
            s(self, name, _check_int(getattr(self, name), name))
        for name in ("ir_hfov_deg", "rgb_hfov_deg", "projector_hfov_deg"):
            s(self, name, _check_float(getattr(self, name), name, 0.0, 170.0, lo_open=True))
        s(self, "ir_dist", _check_dist(self.ir_dist, "ir_dist"))
        s(self, "rgb_dist", _check_dist(self.rgb_dist, "rgb_dist"))
        for name in ("working_distance_mm", "baseline_mm"):
            s(self, name, _check_float(getattr(self, name), name, 0.0, lo_open=True))
        s(self, "rgb_height_mm", _check_float(self.rgb_height_mm, "rgb_height_mm"))
        s(self, "aim_height_mm", _check_float(self.aim_height_mm, "aim_height_mm"))
        s(self, "calib_rot_deg", _check_float(self.calib_rot_deg, "calib_rot_deg", 0.0, 180.0))
        s(self, "calib_trans_mm", _check_float(self.calib_trans_mm, "calib_trans_mm", 0.0))
        names = tuple(self.group_names) if not isinstance(self.group_names, str) else None
        if not names:
            raise ValueError(f"group_names: must be a non-empty sequence of names, got {self.group_names!r}")
        for n in names:
            if not isinstance(n, str) or not _ID_RE.match(n):
                raise ValueError(f"group_names: {n!r} is not a valid identifier "
                                 "(^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$)")
        if len(set(names)) != len(names):
            raise ValueError(f"group_names: must be unique, got {names}")
        s(self, "group_names", names)
        for name in ("yaw_deg", "aim_depth_mm"):
            seq = getattr(self, name)
            try:
                vals = tuple(_check_float(v, name) for v in seq)
            except TypeError:
                raise ValueError(f"{name}: must be a sequence of numbers, got {seq!r}") from None
            if len(vals) != len(names):
                raise ValueError(f"{name}: must have one value per group ({len(names)}), got {len(vals)}")
            s(self, name, vals)
        if any(abs(v) >= 180.0 for v in self.yaw_deg):
            raise ValueError(f"yaw_deg: must be in (-180, 180), got {self.yaw_deg}")
        if self.reference_group not in names:
            raise ValueError(f"reference_group: {self.reference_group!r} is not one of group_names {names}")
        for name, d in zip(names, self.aim_depth_mm):
            if d >= self.working_distance_mm:
                raise ValueError(f"aim_depth_mm: group {name!r} aim depth {d} must be smaller than "
                                 f"working_distance_mm {self.working_distance_mm}")

    # -- derived ------------------------------------------------------------------------
    def intrinsics(self, hfov_deg: float, width: int, height: int) -> np.ndarray:
        """Intrinsic matrix of a centred pinhole with square pixels.

        Parameters
        ----------
        hfov_deg : float
            Horizontal field of view in degrees.
        width, height : int
            Image size in pixels.

        Returns
        -------
        (3, 3) float64
            ``[[f, 0, (W-1)/2], [0, f, (H-1)/2], [0, 0, 1]]`` with
            ``f = (W/2) / tan(hfov/2)`` pixels.
        """
        f = (width / 2.0) / math.tan(math.radians(hfov_deg) / 2.0)
        return np.array([[f, 0.0, (width - 1) / 2.0], [0.0, f, (height - 1) / 2.0], [0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class Group:
    """One rigidly mounted camera group.

    Attributes
    ----------
    name : str
        Group identifier (``"left"``, ``"middle"``, ``"right"``).
    ir : Camera
        The IR camera that sees the fringes (may have distortion).
    projector : Camera
        The fringe projector as an inverse camera; its distortion must be zero.
    rgb : Camera
        The colour camera.

    Raises
    ------
    ValueError
        When the name is not a valid identifier, a member is not a ``Camera`` or the
        projector has distortion.
    """

    name: str
    ir: Camera
    projector: Camera
    rgb: Camera

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _ID_RE.match(self.name):
            raise ValueError(f"name: {self.name!r} is not a valid group identifier")
        for k in ("ir", "projector", "rgb"):
            if not isinstance(getattr(self, k), Camera):
                raise ValueError(f"{k}: expected a Camera, got {type(getattr(self, k)).__name__}")
        if self.projector.has_distortion:
            raise ValueError(f"projector: must have zero distortion, got {self.projector.dist.tolist()}")

    def cameras(self) -> tuple[Camera, Camera, Camera]:
        """``(ir, projector, rgb)``."""
        return self.ir, self.projector, self.rgb

    def to_dict(self) -> dict:
        """JSON-serialisable description (``Camera.to_dict`` of every member)."""
        return {"name": self.name, "ir": self.ir.to_dict(), "projector": self.projector.to_dict(),
                "rgb": self.rgb.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "Group":
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on missing or malformed fields."""
        if not isinstance(d, dict):
            raise ValueError(f"group description: expected a dict, got {type(d).__name__}")
        missing = [k for k in ("name", "ir", "projector", "rgb") if k not in d]
        if missing:
            raise ValueError(f"group description misses field(s) {missing}")
        return cls(d["name"], Camera.from_dict(d["ir"]), Camera.from_dict(d["projector"]),
                   Camera.from_dict(d["rgb"]))


@dataclass(frozen=True)
class Rig:
    """All groups of a rig, in a fixed order.

    Attributes
    ----------
    groups : tuple of Group
        Non-empty, unique names.

    Raises
    ------
    ValueError
        When there is no group, a member is not a ``Group`` or names repeat.
    """

    groups: tuple[Group, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        groups = tuple(self.groups)
        if not groups:
            raise ValueError("groups: a rig needs at least one group")
        for g in groups:
            if not isinstance(g, Group):
                raise ValueError(f"groups: expected Group members, got {type(g).__name__}")
        names = [g.name for g in groups]
        if len(set(names)) != len(names):
            raise ValueError(f"groups: names must be unique, got {names}")
        object.__setattr__(self, "groups", groups)

    @property
    def names(self) -> tuple[str, ...]:
        """Group names in rig order."""
        return tuple(g.name for g in self.groups)

    def group(self, name: str) -> Group:
        """The group called ``name``.

        Parameters
        ----------
        name : str

        Returns
        -------
        Group

        Raises
        ------
        ValueError
            When the rig has no such group.
        """
        for g in self.groups:
            if g.name == name:
                return g
        raise ValueError(f"name: no group {name!r} in rig (groups: {list(self.names)})")

    def to_dict(self) -> dict:
        """JSON-serialisable description: ``{"version": 1, "groups": [Group.to_dict()...]}``."""
        return {"version": 1, "groups": [g.to_dict() for g in self.groups]}

    @classmethod
    def from_dict(cls, d: dict) -> "Rig":
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on missing or malformed fields."""
        if not isinstance(d, dict) or "groups" not in d:
            raise ValueError("rig description: expected a dict with a 'groups' list")
        if d.get("version", 1) != 1:
            raise ValueError(f"rig description: unsupported version {d.get('version')!r}")
        return cls(tuple(Group.from_dict(g) for g in d["groups"]))


# -- construction ---------------------------------------------------------------------------

def _yaw_matrix(yaw_deg: float) -> np.ndarray:
    return rotation_about_axis((0.0, 1.0, 0.0), math.radians(yaw_deg))


def build_rig(params: RigParams | None = None) -> Rig:
    """The true rig for ``params`` (see the module docstring for the geometry).

    Parameters
    ----------
    params : RigParams, optional
        Defaults to ``RigParams()``.

    Returns
    -------
    Rig
        Groups in ``params.group_names`` order. Camera names are ``"<group>/ir"``,
        ``"<group>/projector"`` and ``"<group>/rgb"``.

    Raises
    ------
    ValueError
        When ``params`` is not a ``RigParams``.
    """
    p = RigParams() if params is None else params
    if not isinstance(p, RigParams):
        raise ValueError(f"params: expected RigParams, got {type(p).__name__}")
    K_ir = p.intrinsics(p.ir_hfov_deg, p.width, p.height)
    K_rgb = p.intrinsics(p.rgb_hfov_deg, p.width, p.height)
    K_prj = p.intrinsics(p.projector_hfov_deg, p.projector_width, p.projector_height)
    up = np.array([0.0, 1.0, 0.0])
    groups = []
    for name, yaw, depth in zip(p.group_names, p.yaw_deg, p.aim_depth_mm):
        Ry = _yaw_matrix(yaw)
        aim = Ry @ np.array([0.0, p.aim_height_mm, depth])
        centre = aim + p.working_distance_mm * (Ry @ np.array([0.0, 0.0, 1.0]))
        R_g, _ = look_at(centre, aim, up)
        x_g, y_g = R_g[0], R_g[1]
        # The projector sits on the image-right side; a group at positive yaw is mirrored so
        # that its projector, too, stands on the side of the face's midline (see RigParams).
        side = -1.0 if (p.projector_toward_front and yaw > 0) else 1.0
        c_ir = centre - side * 0.5 * p.baseline_mm * x_g
        c_prj = centre + side * 0.5 * p.baseline_mm * x_g
        c_rgb = centre - p.rgb_height_mm * y_g
        ir = Camera(f"{name}/ir", p.width, p.height, K_ir, np.array(p.ir_dist), *look_at(c_ir, aim, up))
        prj = Camera(f"{name}/projector", p.projector_width, p.projector_height, K_prj, np.zeros(5),
                     *look_at(c_prj, aim, up))
        rgb = Camera(f"{name}/rgb", p.width, p.height, K_rgb, np.array(p.rgb_dist), *look_at(c_rgb, aim, up))
        groups.append(Group(name, ir, prj, rgb))
    return Rig(tuple(groups))


# -- randomness helpers (shared with the scanner) ---------------------------------------------

def root_entropy(rng) -> int:
    """A top-level integer seed for ``kernels.synth.seeding.derive_rng``.

    Parameters
    ----------
    rng : int or numpy.random.Generator or None
        An int seed (>= 0) is used as is, so results are a function of the seed alone;
        a Generator contributes one draw; None draws fresh OS entropy.

    Returns
    -------
    int
        A seed >= 0.

    Raises
    ------
    ValueError
        For a negative seed or an unsupported type.
    """
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        if int(rng) < 0:
            raise ValueError(f"rng: an int seed must be >= 0, got {rng}")
        return int(rng)
    if rng is None:
        return int(np.random.SeedSequence().entropy)
    gen = as_rng(rng)
    return int(gen.integers(0, 2**63, dtype=np.int64))


# -- calibration error --------------------------------------------------------------------------

def _random_unit(gen: np.random.Generator) -> np.ndarray:
    while True:
        v = gen.standard_normal(3)
        n = np.linalg.norm(v)
        if n > 1e-6:
            return v / n


def _move_camera(cam: Camera, R_e: np.ndarray, pivot: np.ndarray, t_e: np.ndarray) -> Camera:
    # The device moves by M(X) = R_e (X - pivot) + pivot + t_e; a world point X is seen
    # where the unmoved device saw M^-1(X): R' = R R_e^T, centre' = M(centre).
    R_new = cam.R @ R_e.T
    c_new = R_e @ (cam.center - pivot) + pivot + t_e
    return cam.with_pose(R_new, -R_new @ c_new)


def perturb_rig(rig: Rig, params: RigParams | None = None, rng=None) -> Rig:
    """The rig as its calibration believes it (the "stored" calibration).

    The reference group (``params.reference_group``, default ``middle``) is exact and
    defines the world frame. Every other group is moved as a rigid unit (IR camera,
    projector and RGB camera together, so the intra-group calibration stays exact) by
    ``M(X) = R_e (X - C_ir) + C_ir + t_e``: a rotation of exactly ``calib_rot_deg`` about
    a uniformly random axis through the group's IR camera centre ``C_ir``, then a
    translation ``t_e`` of norm exactly ``calib_trans_mm`` in a uniformly random
    direction. Hence :func:`group_pose_error` returns exactly the configured pair.

    Parameters
    ----------
    rig : Rig
        The true rig (e.g. from :func:`build_rig`).
    params : RigParams, optional
        Supplies ``calib_rot_deg``, ``calib_trans_mm`` and ``reference_group``;
        defaults to ``RigParams()``.
    rng : numpy.random.Generator or int or None
        Randomness; each group's error is drawn from a child generator keyed by the
        group name (independent of the group order).

    Returns
    -------
    Rig
        Same groups and intrinsics, perturbed side-group poses.

    Raises
    ------
    ValueError
        When ``rig`` is not a ``Rig`` or lacks the reference group.
    """
    p = RigParams() if params is None else params
    if not isinstance(rig, Rig):
        raise ValueError(f"rig: expected a Rig, got {type(rig).__name__}")
    if not isinstance(p, RigParams):
        raise ValueError(f"params: expected RigParams, got {type(p).__name__}")
    if p.reference_group not in rig.names:
        raise ValueError(f"params.reference_group: {p.reference_group!r} is not a group of the rig "
                         f"(groups: {list(rig.names)})")
    entropy = root_entropy(rng)
    out = []
    for g in rig.groups:
        if g.name == p.reference_group:
            out.append(g)
            continue
        gen = derive_rng(entropy, "calibration", g.name)
        R_e = rotation_about_axis(_random_unit(gen), math.radians(p.calib_rot_deg))
        t_e = p.calib_trans_mm * _random_unit(gen)
        pivot = g.ir.center
        out.append(Group(g.name, *(_move_camera(c, R_e, pivot, t_e) for c in g.cameras())))
    return Rig(tuple(out))


def rotation_angle_deg(R: np.ndarray) -> float:
    """Rotation angle of a rotation matrix (robust for small angles).

    Parameters
    ----------
    R : (3, 3) float64

    Returns
    -------
    float
        Angle in degrees in [0, 180], from ``atan2(|axial(R - R^T)| / 2, (tr R - 1) / 2)``.

    Raises
    ------
    ValueError
        When ``R`` is not a finite (3, 3) array.
    """
    R = as_array(R, "R", (3, 3), finite=True)
    s = 0.5 * np.linalg.norm([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])
    c = 0.5 * (np.trace(R) - 1.0)
    return math.degrees(math.atan2(s, c))


def group_pose_error(true_group: Group, stored_group: Group) -> tuple[float, float]:
    """Pose error of a stored group against the true one.

    The group pose is the pose of its IR camera (the frame of the decoded points).

    Parameters
    ----------
    true_group, stored_group : Group

    Returns
    -------
    rot_deg : float
        Angle of ``R_stored @ R_true.T`` (IR camera) in degrees.
    trans_mm : float
        Distance between the stored and true IR camera centres in mm.

    Raises
    ------
    ValueError
        When an argument is not a ``Group``.
    """
    for name, g in (("true_group", true_group), ("stored_group", stored_group)):
        if not isinstance(g, Group):
            raise ValueError(f"{name}: expected a Group, got {type(g).__name__}")
    a, b = true_group.ir, stored_group.ir
    return rotation_angle_deg(b.R @ a.R.T), float(np.linalg.norm(b.center - a.center))
