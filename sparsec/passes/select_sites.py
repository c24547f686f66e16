"""select_sites: choose the sites each [[prune]] group targets.

before: GraphInfo.candidates lists every site.  after: GraphInfo.sites holds the selected ones
with their group, method, density, scope, block and padding; the weight and its consuming op are
tagged (roles `weight`, `site_op`); unselected candidates are in GraphInfo.left_out with the reason.
A site selected by two groups, or a group that selects nothing, is a user error.
requires: sites_found.  ensures: sites_selected.
"""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, replace
from typing import Sequence

import torch.fx as fx

from sparsec import blocks
from sparsec.errors import PassError
from sparsec.ir import ROLE_SITE_OP, ROLE_WEIGHT, graph_info, set_node_info
from sparsec.site_ops import site_operand
from sparsec.pipeline import Pass, PassResult


def _matches(name: str, patterns: Sequence[str]) -> str | None:
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


@dataclass(frozen=True)
class SelectSites(Pass):
    groups: tuple = ()
    require_sites: bool = True    # a group that selects nothing is an error (not in a dry run)
    name = "select_sites"
    stage = "select"
    requires = ("sites_found",)
    ensures = ("sites_selected",)

    def run(self, gm: fx.GraphModule) -> PassResult:
        info = graph_info(gm)
        info.sites.clear()
        chosen: dict[str, int] = {}
        for name, site in info.candidates.items():
            hits = []
            reasons = []
            for group in self.groups:
                target = _matches(name, group.targets)
                if target is None:
                    continue
                excluded = _matches(name, group.exclude)
                if excluded is not None:
                    reasons.append(f"excluded by prune[{group.index}].exclude {excluded!r}")
                    continue
                hits.append(group)
            if len(hits) > 1:
                which = " and ".join(f"prune[{g.index}]" for g in hits)
                raise PassError(f"site {name!r} is selected by {which}; make the groups' targets "
                                f"disjoint (add it to one group's exclude)")
            if not hits:
                info.left_out[name] = "; ".join(reasons) or "not matched by any [[prune]] targets"
                continue
            group = hits[0]
            block = tuple(group.block)
            info.sites[name] = replace(site, group=group.index, method=group.method,
                                       density=group.density, scope=group.scope, block=block,
                                       padding=blocks.padding(site.shape, block),
                                       balanced=group.balanced)
            chosen[name] = group.index
        self._check_named_weights_are_sites(info)
        if self.require_sites:
            self._check_every_group_selects(info)
        for node in gm.graph.nodes:
            if node.op == "get_attr" and str(node.target) in info.sites:
                set_node_info(node, ROLE_WEIGHT, str(node.target))
                for user in node.users:
                    if site_operand(user, gm) is not None:
                        set_node_info(user, ROLE_SITE_OP, str(node.target))
        return PassResult(gm, modified=False)

    def _check_named_weights_are_sites(self, info) -> None:
        """A target without wildcards names one weight: when that weight is not a site, the group
        would silently prune less than asked, so it is an error that says why."""
        for group in self.groups:
            for target in group.targets:
                if any(c in target for c in "*?[") or target in info.candidates:
                    continue
                why = info.left_out.get(target)
                if why is not None and target not in info.sites:
                    raise PassError(f"prune[{group.index}].targets names {target!r}, which cannot be pruned: "
                                    f"it is {why}")

    def _check_every_group_selects(self, info) -> None:
        for group in self.groups:
            if any(site.group == group.index for site in info.sites.values()):
                continue
            names = list(info.candidates)
            near = difflib.get_close_matches(group.targets[0], names, n=2, cutoff=0.3)
            hint = f" (sites are named like {', '.join(repr(n) for n in near or names[:2])}" \
                   f"; `sparsec compile --dry-run` lists them)" if names else " (the model has no sites)"
            raise PassError(f"prune[{group.index}].targets {list(group.targets)} selected no site{hint}")
