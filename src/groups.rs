//! Group chats: membership on the group's owner, one order for every member.
//!
//! Owns: each owned group's membership (admin, members in join order, persisted in the owner's
//! store), the admin rules, and the fan-out that gives a group one order: the group's owner
//! handles every send and membership change of the group in arrival order, and hands each one
//! to every member's owner through the router's FIFOs (one message per destination shard
//! carrying all of that shard's members), so every member's log has the group's events in the
//! same relative order. Member owners append idempotently (by event id) and confirm; the group's
//! owner confirms a send to the sender's owner once every shard confirmed.
//!
//! Must not: write another shard's logs directly, or let a fan-out overtake an earlier one
//! (fan-outs run as after-commit actions, which run in order).

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;

use crate::ids::{ConnRef, DeviceId, GroupId, MsgId, Seq, ShardId, UserId};
use crate::protocol::{ErrorCode, EventBody, FrameError, GroupOp, encode_event};
use crate::router::{Delivery, ForeignEvent, ForeignKind, ShardMsg};
use crate::shard::{AfterCommit, Shard};
use crate::storage::{StoreError, WriteOp};

/// An owned group's membership.
#[derive(Debug, Clone)]
pub struct GroupState {
    pub admin: UserId,
    /// Member → join order (smaller = longer-standing).
    pub members: BTreeMap<UserId, u64>,
    pub next_order: u64,
}

impl GroupState {
    fn encode(&self) -> Vec<u8> {
        let members: Vec<serde_json::Value> = self
            .members
            .iter()
            .map(|(user, order)| serde_json::json!([user.as_str(), order]))
            .collect();
        serde_json::json!({"v": 1, "admin": self.admin.as_str(), "next": self.next_order, "members": members})
            .to_string()
            .into_bytes()
    }

    fn decode(record: &[u8]) -> Option<GroupState> {
        let v: serde_json::Value = serde_json::from_slice(record).ok()?;
        let mut members = BTreeMap::new();
        for entry in v["members"].as_array()? {
            members.insert(UserId::parse(entry[0].as_str()?)?, entry[1].as_u64()?);
        }
        Some(GroupState {
            admin: UserId::parse(v["admin"].as_str()?)?,
            members,
            next_order: v["next"].as_u64()?,
        })
    }

    /// Members in join order.
    fn member_list(&self) -> Vec<UserId> {
        let mut list: Vec<(&UserId, &u64)> = self.members.iter().collect();
        list.sort_by_key(|(_, order)| **order);
        list.into_iter().map(|(user, _)| user.clone()).collect()
    }

    /// After members left: the longest-standing remaining member becomes admin if the admin left.
    fn settle_admin(&mut self) {
        if !self.members.contains_key(&self.admin)
            && let Some((user, _)) = self.members.iter().min_by_key(|(_, order)| **order)
        {
            self.admin = user.clone();
        }
    }
}

/// What a group fan-out appends to each member's log.
#[derive(Debug, Clone)]
pub enum GroupEvent {
    /// A message to the group.
    Msg {
        from: UserId,
        dev: DeviceId,
        body: String,
    },
    /// A membership change.
    Membership {
        op: &'static str,
        members: Vec<UserId>,
        by: UserId,
    },
}

/// One group event on its way to the members' owners.
#[derive(Debug, Clone)]
pub struct FanOut {
    /// Event id: the message id of a send, a minted id for a membership change. Member owners
    /// append each id at most once per member.
    pub id: MsgId,
    pub group: GroupId,
    pub ts_ms: u64,
    pub event: GroupEvent,
    /// Who gets it, fixed when the group's owner ordered it.
    pub recipients: Vec<UserId>,
    /// The sender's owner, waiting for the confirmation of a send.
    pub origin: Option<ShardId>,
    /// A `pending` record guards this fan-out on the group's owner (membership changes).
    pub guarded: bool,
}

/// The part of a fan-out one destination shard handles.
#[derive(Debug, Clone)]
pub struct GroupAppend {
    pub id: MsgId,
    pub group: GroupId,
    /// The group's owner, which waits for the confirmation.
    pub group_shard: ShardId,
    pub ts_ms: u64,
    pub event: GroupEvent,
    pub members: Vec<UserId>,
}

/// A fan-out waiting for its destination shards.
#[derive(Debug)]
pub struct FanOutProgress {
    outstanding: usize,
    origin: Option<ShardId>,
    guarded: bool,
}

fn chat_name(group: &GroupId) -> String {
    format!("g:{group}")
}

impl Shard {
    /// Runs `f` on an owned group's state (`None` when the group does not exist).
    fn with_group<R>(
        &self,
        group: &GroupId,
        f: impl FnOnce(&mut Option<GroupState>) -> R,
    ) -> Result<R, StoreError> {
        let mut groups = self.groups.borrow_mut();
        let mut state = match groups.remove(group) {
            Some(state) => Some(state),
            None => self
                .store()
                .group_get(&chat_name(group))?
                .and_then(|record| GroupState::decode(&record)),
        };
        let result = f(&mut state);
        if let Some(state) = state {
            groups.insert(group.clone(), state);
        }
        Ok(result)
    }

    // -----------------------------------------------------------------------------------------
    // Membership.

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn on_group_op(
        &self,
        user: UserId,
        conn: ConnRef,
        op: GroupOp,
        group: GroupId,
        members: Vec<UserId>,
        reply_id: Option<String>,
    ) {
        let fail = |e: FrameError| self.to_conn_error(conn, e.with_id(reply_id.as_deref()));
        let max = self.config.max_group_members;
        let chat = chat_name(&group);
        let outcome = self.with_group(&group, |slot| {
            let change = decide_change(slot, op, &user, &members, max, &chat)?;
            Ok(change.map(|change| {
                // Persist the new membership, or forget a group whose last member left.
                let write = match slot.as_ref().filter(|state| !state.members.is_empty()) {
                    Some(state) => WriteOp::PutGroup {
                        group: chat.clone(),
                        record: state.encode(),
                    },
                    None => {
                        *slot = None;
                        WriteOp::DeleteGroup {
                            group: chat.clone(),
                        }
                    }
                };
                (change, write)
            }))
        });
        let (change, membership_op) = match outcome {
            Err(e) => return fail(Self::store_error_frame(&e)),
            Ok(Err(e)) => return fail(e),
            Ok(Ok(None)) => return,
            Ok(Ok(Some(found))) => found,
        };
        let id = self.minter.mint(&self.clock);
        self.minted.set(Some(id));
        let fan_out = FanOut {
            id,
            group,
            ts_ms: self.clock.now_ms(),
            event: GroupEvent::Membership {
                op: change.op,
                members: change.members,
                by: user,
            },
            recipients: change.recipients,
            origin: None,
            guarded: true,
        };
        let ops = vec![
            membership_op,
            WriteOp::PutPending {
                msg: id,
                record: encode_fan_out(&fan_out),
            },
        ];
        self.stage(ops, vec![AfterCommit::FanOut(Box::new(fan_out))]);
    }

    /// An owned group's admin and members in join order (`None`: no such group).
    pub(crate) fn group_snapshot(
        &self,
        group: &GroupId,
    ) -> Result<Option<(UserId, Vec<UserId>)>, StoreError> {
        self.with_group(group, |slot| {
            slot.as_ref()
                .map(|state| (state.admin.clone(), state.member_list()))
        })
    }

    // -----------------------------------------------------------------------------------------
    // Sending.

    /// A message to an owned group: check membership, then fan it out in the group's order
    /// (after every earlier membership change of the group is committed).
    pub(crate) fn on_group_send(&self, delivery: Delivery, group: GroupId) {
        let recipients = self.with_group(&group, |slot| {
            slot.as_ref()
                .filter(|state| state.members.contains_key(&delivery.from))
                .map(GroupState::member_list)
        });
        let recipients = match recipients {
            Ok(Some(recipients)) => recipients,
            Ok(None) => {
                return self.route_delivered(
                    delivery.origin,
                    delivery.msg,
                    Err(ErrorCode::NotMember),
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "group lookup failed");
                return self.route_delivered(delivery.origin, delivery.msg, Err(ErrorCode::Busy));
            }
        };
        let fan_out = FanOut {
            id: delivery.msg,
            group,
            ts_ms: delivery.ts_ms,
            event: GroupEvent::Msg {
                from: delivery.from,
                dev: delivery.device,
                body: delivery.body,
            },
            recipients,
            origin: Some(delivery.origin),
            guarded: false,
        };
        // No write: the action only waits its turn behind earlier commits of this shard.
        self.stage(Vec::new(), vec![AfterCommit::FanOut(Box::new(fan_out))]);
    }

    pub(crate) fn route_delivered(
        &self,
        origin: ShardId,
        msg: MsgId,
        result: Result<(), ErrorCode>,
    ) {
        if origin == self.id {
            self.on_delivered(msg, result);
        } else {
            self.router
                .route(origin, ShardMsg::Delivered { msg, result });
        }
    }

    /// Hands a group event to every recipient's owner, one message per shard.
    pub(crate) fn fan_out(&self, fan_out: FanOut) {
        let mut by_shard: HashMap<ShardId, Vec<UserId>> = HashMap::new();
        for member in fan_out.recipients {
            by_shard
                .entry(self.owner_of(&member))
                .or_default()
                .push(member);
        }
        self.fan_outs.borrow_mut().insert(
            fan_out.id,
            FanOutProgress {
                outstanding: by_shard.len(),
                origin: fan_out.origin,
                guarded: fan_out.guarded,
            },
        );
        for (shard, members) in by_shard {
            let append = GroupAppend {
                id: fan_out.id,
                group: fan_out.group.clone(),
                group_shard: self.id,
                ts_ms: fan_out.ts_ms,
                event: fan_out.event.clone(),
                members,
            };
            self.router
                .route(shard, ShardMsg::GroupAppend(Box::new(append)));
        }
    }

    /// A member owner: append the group event to each of its members' logs (once per id).
    pub(crate) fn on_group_append(&self, append: GroupAppend) {
        let chat = chat_name(&append.group);
        let mut ops = Vec::new();
        let mut actions = Vec::new();
        for member in &append.members {
            let key = (member.clone(), append.id);
            if self.delivering.borrow().contains(&key) {
                continue;
            }
            match self.store().msg_index_get(member, append.id) {
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, "group append lookup failed");
                    continue;
                }
            }
            let seq = match self.with_user(member, |state| state.next_seq()) {
                Ok(seq) => seq,
                Err(e) => {
                    tracing::error!(%member, error = %e, "group append failed");
                    continue;
                }
            };
            let record = encode_group_event(seq, append.ts_ms, &chat, append.id, &append.event);
            ops.push(WriteOp::Append {
                user: member.clone(),
                seq,
                record: record.clone(),
            });
            ops.push(WriteOp::IndexMsg {
                user: member.clone(),
                msg: append.id,
                seq,
            });
            if matches!(append.event, GroupEvent::Msg { .. }) {
                ops.push(WriteOp::IndexChat {
                    user: member.clone(),
                    chat: chat.clone(),
                    msg: append.id,
                    seq,
                });
            }
            self.delivering.borrow_mut().insert(key);
            actions.push(AfterCommit::Publish {
                user: member.clone(),
                events: vec![(seq, record)],
            });
            if let GroupEvent::Msg { from, .. } = &append.event
                && from != member
                && !self.hooks.is_empty()
            {
                actions.push(AfterCommit::Committed {
                    user: member.clone(),
                    msg: append.id,
                    chat: chat.clone(),
                    from: from.clone(),
                    ts_ms: append.ts_ms,
                });
            }
        }
        actions.push(AfterCommit::GroupAppended {
            group_shard: append.group_shard,
            id: append.id,
            members: append.members,
        });
        self.stage(ops, actions);
    }

    /// After a member owner committed (or failed to commit) its part of a fan-out.
    pub(crate) fn group_appended(
        &self,
        group_shard: ShardId,
        id: MsgId,
        members: Vec<UserId>,
        ok: bool,
    ) {
        {
            let mut delivering = self.delivering.borrow_mut();
            for member in members {
                delivering.remove(&(member, id));
            }
        }
        if group_shard == self.id {
            self.on_group_appended(id, ok);
        } else {
            self.router
                .route(group_shard, ShardMsg::GroupAppended { id, ok });
        }
    }

    /// The group's owner: one more destination shard has its part durable. A failed part ends
    /// the fan-out: the sender's owner hears `busy` and a retry fans out again (member owners
    /// skip what they already have); a membership fan-out stays pending and is re-driven at the
    /// next start.
    pub(crate) fn on_group_appended(&self, id: MsgId, ok: bool) {
        if !ok {
            let Some(progress) = self.fan_outs.borrow_mut().remove(&id) else {
                return;
            };
            tracing::error!(id = id.0, "a group fan-out failed on a member shard");
            if let Some(origin) = progress.origin {
                self.route_delivered(origin, id, Err(ErrorCode::Busy));
            }
            return;
        }
        let done = {
            let mut fan_outs = self.fan_outs.borrow_mut();
            let Some(progress) = fan_outs.get_mut(&id) else {
                return;
            };
            progress.outstanding -= 1;
            if progress.outstanding > 0 {
                return;
            }
            fan_outs.remove(&id).expect("present")
        };
        if done.guarded {
            self.lazy_ops
                .borrow_mut()
                .push(WriteOp::DeletePending { msg: id });
        }
        if let Some(origin) = done.origin {
            self.route_delivered(origin, id, Ok(()));
        }
    }

    // -----------------------------------------------------------------------------------------
    // Typing, edits and deletes in groups.

    /// The group's owner relays a typing indicator to the other members' owners.
    pub(crate) fn on_group_typing(&self, group: GroupId, from: UserId, on: bool) {
        let members = self.with_group(&group, |slot| {
            slot.as_ref()
                .filter(|state| state.members.contains_key(&from))
                .map(GroupState::member_list)
        });
        let Ok(Some(members)) = members else {
            return;
        };
        let chat = chat_name(&group);
        for member in members.into_iter().filter(|m| *m != from) {
            let owner = self.owner_of(&member);
            // Ephemeral: dropped at the bound rather than queued without limit.
            let _ = self.router.try_route(
                owner,
                ShardMsg::Typing {
                    to: member,
                    chat: chat.clone(),
                    from: from.clone(),
                    on,
                },
            );
        }
    }

    /// The group's owner relays an edit or delete by `from` to the other members' owners.
    pub(crate) fn on_group_foreign(
        &self,
        group: GroupId,
        from: UserId,
        ts_ms: u64,
        kind: ForeignKind,
    ) {
        let members = self.with_group(&group, |slot| slot.as_ref().map(GroupState::member_list));
        let Ok(Some(members)) = members else {
            return;
        };
        for member in members.into_iter().filter(|m| *m != from) {
            let owner = self.owner_of(&member);
            self.router.route(
                owner,
                ShardMsg::Append(ForeignEvent {
                    to: member,
                    ts_ms,
                    kind: kind.clone(),
                }),
            );
        }
    }

    /// Re-drives a membership fan-out that was stored but never confirmed (after a crash).
    pub(crate) fn resume_fan_out(&self, fan_out: FanOut) {
        self.fan_out(fan_out);
    }
}

/// Applies a membership operation to a group's state (`None`: the group does not exist) and
/// says what changed; `Ok(None)` when nothing did (adding members who are all members already).
fn decide_change(
    slot: &mut Option<GroupState>,
    op: GroupOp,
    user: &UserId,
    members: &[UserId],
    max: usize,
    chat: &str,
) -> Result<Option<Change>, FrameError> {
    let user = user.clone();
    match op {
        GroupOp::Create => {
            if slot.is_some() {
                return Err(FrameError::new(
                    ErrorCode::Forbidden,
                    format!("{chat} already exists"),
                ));
            }
            let mut state = GroupState {
                admin: user.clone(),
                members: BTreeMap::new(),
                next_order: 0,
            };
            for member in std::iter::once(&user).chain(members.iter()) {
                if !state.members.contains_key(member) {
                    state.members.insert(member.clone(), state.next_order);
                    state.next_order += 1;
                }
            }
            if state.members.len() > max {
                return Err(group_full(max));
            }
            let all = state.member_list();
            *slot = Some(state);
            Ok(Some(Change::new("created", all.clone(), all)))
        }
        GroupOp::Add | GroupOp::Remove | GroupOp::Leave => {
            let Some(state) = slot.as_mut() else {
                return Err(not_member(chat));
            };
            if !state.members.contains_key(&user) {
                return Err(not_member(chat));
            }
            if op != GroupOp::Leave && state.admin != user {
                return Err(FrameError::new(
                    ErrorCode::NotAdmin,
                    format!("only the admin of {chat} may add or remove members"),
                ));
            }
            let change = match op {
                GroupOp::Add => {
                    let mut added = Vec::new();
                    for member in members {
                        if !state.members.contains_key(member) && !added.contains(member) {
                            added.push(member.clone());
                        }
                    }
                    if added.is_empty() {
                        return Ok(None);
                    }
                    if state.members.len() + added.len() > max {
                        return Err(group_full(max));
                    }
                    for member in &added {
                        state.members.insert(member.clone(), state.next_order);
                        state.next_order += 1;
                    }
                    Change::new("added", added, state.member_list())
                }
                GroupOp::Remove | GroupOp::Leave => {
                    let leaving: Vec<UserId> = if op == GroupOp::Leave {
                        vec![user.clone()]
                    } else {
                        let mut found = Vec::new();
                        for member in members {
                            if state.members.contains_key(member) && !found.contains(member) {
                                found.push(member.clone());
                            }
                        }
                        found
                    };
                    if leaving.is_empty() {
                        return Ok(None);
                    }
                    // Everyone who was a member hears it: the removed members' last
                    // event from this group.
                    let recipients = state.member_list();
                    for member in &leaving {
                        state.members.remove(member);
                    }
                    state.settle_admin();
                    let op = if op == GroupOp::Leave {
                        "left"
                    } else {
                        "removed"
                    };
                    Change::new(op, leaving, recipients)
                }
                GroupOp::Create => unreachable!("handled above"),
            };
            Ok(Some(change))
        }
    }
}

/// A membership change decided by the group's owner.
struct Change {
    op: &'static str,
    members: Vec<UserId>,
    recipients: Vec<UserId>,
}

impl Change {
    fn new(op: &'static str, members: Vec<UserId>, recipients: Vec<UserId>) -> Self {
        Change {
            op,
            members,
            recipients,
        }
    }
}

fn not_member(chat: &str) -> FrameError {
    FrameError::new(
        ErrorCode::NotMember,
        format!("you are not a member of {chat}"),
    )
}

fn group_full(max: usize) -> FrameError {
    FrameError::new(
        ErrorCode::GroupFull,
        format!("a group has at most {max} members"),
    )
}

fn encode_group_event(seq: Seq, ts_ms: u64, chat: &str, id: MsgId, event: &GroupEvent) -> Bytes {
    match event {
        GroupEvent::Msg { from, dev, body } => encode_event(
            seq,
            ts_ms,
            &EventBody::Msg {
                chat,
                msg: id,
                from: from.as_str(),
                dev: dev.as_str(),
                body,
            },
        ),
        GroupEvent::Membership { op, members, by } => encode_event(
            seq,
            ts_ms,
            &EventBody::Group {
                chat,
                op,
                members,
                by: by.as_str(),
            },
        ),
    }
}

/// Encodes a membership fan-out for the `pending` table.
fn encode_fan_out(fan_out: &FanOut) -> Vec<u8> {
    let GroupEvent::Membership { op, members, by } = &fan_out.event else {
        unreachable!("only membership fan-outs are guarded by a pending record");
    };
    let names = |list: &[UserId]| {
        list.iter()
            .map(|u| u.as_str().to_owned())
            .collect::<Vec<_>>()
    };
    serde_json::json!({
        "v": 1,
        "kind": "fanout",
        "id": fan_out.id.0,
        "group": fan_out.group.as_str(),
        "ts": fan_out.ts_ms,
        "op": op,
        "members": names(members),
        "by": by.as_str(),
        "recipients": names(&fan_out.recipients),
    })
    .to_string()
    .into_bytes()
}

/// Decodes a membership fan-out `pending` record.
pub(crate) fn decode_fan_out(record: &[u8]) -> Option<FanOut> {
    let v: serde_json::Value = serde_json::from_slice(record).ok()?;
    if v["kind"] != "fanout" {
        return None;
    }
    let users = |field: &str| -> Option<Vec<UserId>> {
        v[field]
            .as_array()?
            .iter()
            .map(|u| UserId::parse(u.as_str()?))
            .collect()
    };
    let op = match v["op"].as_str()? {
        "created" => "created",
        "added" => "added",
        "removed" => "removed",
        "left" => "left",
        _ => return None,
    };
    Some(FanOut {
        id: MsgId(v["id"].as_u64()?),
        group: GroupId::parse(v["group"].as_str()?)?,
        ts_ms: v["ts"].as_u64()?,
        event: GroupEvent::Membership {
            op,
            members: users("members")?,
            by: UserId::parse(v["by"].as_str()?)?,
        },
        recipients: users("recipients")?,
        origin: None,
        guarded: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn membership_records_round_trip_and_admin_passes_to_the_longest_standing() {
        let mut state = GroupState {
            admin: UserId::parse("a").unwrap(),
            members: [("a", 0), ("b", 1), ("c", 2)]
                .into_iter()
                .map(|(u, o)| (UserId::parse(u).unwrap(), o))
                .collect(),
            next_order: 3,
        };
        let back = GroupState::decode(&state.encode()).unwrap();
        assert_eq!(back.member_list(), state.member_list());
        state.members.remove(&UserId::parse("a").unwrap());
        state.settle_admin();
        assert_eq!(state.admin.as_str(), "b");
    }

    #[test]
    fn fan_out_records_round_trip() {
        let fan_out = FanOut {
            id: MsgId(9),
            group: GroupId::parse("team").unwrap(),
            ts_ms: 5,
            event: GroupEvent::Membership {
                op: "added",
                members: vec![UserId::parse("c").unwrap()],
                by: UserId::parse("a").unwrap(),
            },
            recipients: vec![UserId::parse("a").unwrap(), UserId::parse("c").unwrap()],
            origin: None,
            guarded: true,
        };
        let back = decode_fan_out(&encode_fan_out(&fan_out)).unwrap();
        assert_eq!(back.id, fan_out.id);
        assert_eq!(back.recipients, fan_out.recipients);
        assert!(decode_fan_out(b"{\"kind\":\"send\"}").is_none());
    }
}
