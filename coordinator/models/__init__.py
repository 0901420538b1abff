"""The coordinator's tables. Importing this package registers them on SQLModel.metadata
(the ledger's tables come from `pricing`)."""

from coordinator.models.account import Account, AccountPublic, ApiKey
from coordinator.models.audit import Audit, AuditStatus
from coordinator.models.batch import Batch, BatchFile, BatchLine
from coordinator.models.history import MarketMinute, NodeMinute
from coordinator.models.node import Node, NodeNonce, NodeOffer, NodeOfferPublic, NodePublic
from coordinator.models.replica import ApiReplica
from coordinator.models.request import InferenceRequest, ReceiptRecord, RequestStatus
from coordinator.models.web_session import WebSession

import pricing.ledger  # noqa: F401,E402  (ledger tables share the metadata)

__all__ = [
    "Account",
    "AccountPublic",
    "ApiKey",
    "ApiReplica",
    "Audit",
    "AuditStatus",
    "Batch",
    "BatchFile",
    "BatchLine",
    "InferenceRequest",
    "MarketMinute",
    "Node",
    "NodeNonce",
    "NodeOffer",
    "NodeMinute",
    "NodeOfferPublic",
    "NodePublic",
    "ReceiptRecord",
    "RequestStatus",
    "WebSession",
]
