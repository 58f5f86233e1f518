"""The call layer: every call is two INVITE sessions (edge/sip/invite.py) joined by the edge.

One concern per module; imports run one way, top to bottom:

- ``controller`` joins the inbound and outbound session of each call (sippy's
  ``CallController``) and emits call events;
- ``admission`` (SPEC §4.2/§4.3 as an ordered list of named rules, each admit or
  reject), ``routing`` (carrier order, failover policy, the PBX of an incoming call),
  ``media`` (anchoring, echo, the one place an SDP error becomes 488), ``indialog``
  (relaying re-INVITEs and other in-dialog requests), ``billing`` (listens to call
  events: answered -> fund and schedule, ended -> settle; recovery) and ``metrics``;
- ``model``: the Call, its state, side and direction enums, the end reasons.

Below them: ``edge.sip`` (dialogs, sessions, transactions), ``edge.control`` (store,
credit) and ``edge.media`` (the relay). ``edge/node.py`` builds and wires all of it.
"""
