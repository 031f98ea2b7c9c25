"""Feature audits: which features earn their cost, and a prune plan within an AUC budget."""

from leanrec.audit.cost import FeatureCost, feature_costs
from leanrec.audit.importance import PermutationAuditor, permutation_importance, weight_importance
from leanrec.audit.plan import PrunePlan, against_truth, make_plan
from leanrec.audit.run import AuditConfig, AuditError, AuditResult, audit

__all__ = [
    "AuditConfig",
    "AuditError",
    "AuditResult",
    "FeatureCost",
    "PermutationAuditor",
    "PrunePlan",
    "against_truth",
    "audit",
    "feature_costs",
    "make_plan",
    "permutation_importance",
    "weight_importance",
]
