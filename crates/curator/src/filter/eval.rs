//! Evaluation: this module's internal CEL functions, and protobuf messages
//! bound as lazily read CEL values.

use super::*;

/// `@has(x, "f")`: protobuf presence on messages, CEL's usual `has()` on maps.
pub(super) fn has_field<'b, 'v>(
    args: Vec<CowVal<'b, 'v>>,
) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let count = args.len();
    let [target, field]: [CowVal<'b, 'v>; 2] = args
        .try_into()
        .map_err(|_| ExecutionError::invalid_argument_count(2, count))?;
    let field = field
        .downcast_ref::<CelString>()
        .ok_or_else(|| ExecutionError::function_error("has", "field name is not a string"))?
        .inner();
    let indexer = target.as_indexer().ok_or_else(|| {
        ExecutionError::function_error(
            "has",
            format!(
                "a value of type {} has no fields to test",
                target.get_type().name()
            ),
        )
    })?;
    // Only this module's messages are of struct kind: filters cannot build any.
    let present = if target.get_type().kind() == Kind::Struct {
        let present = indexer.get(&PresenceQuery(Cow::Owned(field.to_owned())))?;
        present
            .downcast_ref::<CelBool>()
            .is_some_and(|b| *b.inner())
    } else {
        match indexer.get(&CelString::from(field)) {
            Ok(_) => true,
            Err(ExecutionError::NoSuchKey(_)) => false,
            Err(e) => return Err(e),
        }
    };
    Ok(CowVal::owned(CelBool::from(present)))
}

/// `@bool(x)`: `x` if it is a bool; otherwise an error naming its type.
pub(super) fn require_bool<'b, 'v>(
    args: Vec<CowVal<'b, 'v>>,
) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let count = args.len();
    let [value]: [CowVal<'b, 'v>; 1] = args
        .try_into()
        .map_err(|_| ExecutionError::invalid_argument_count(1, count))?;
    if value.downcast_ref::<CelBool>().is_some() {
        Ok(value)
    } else {
        Err(ExecutionError::function_error(
            RESULT_FN,
            value.get_type().name(),
        ))
    }
}

/// `@matches(s, @reN)`.
pub(super) fn regex_matches<'b, 'v>(
    args: Vec<CowVal<'b, 'v>>,
) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let (Some(text), Some(regex)) = (
        args.first().and_then(|a| a.downcast_ref::<CelString>()),
        args.get(1).and_then(|a| a.downcast_ref::<RegexVal>()),
    ) else {
        return Err(ExecutionError::function_error(
            "matches",
            "expects a string and a pattern",
        ));
    };
    Ok(CowVal::owned(CelBool::from(regex.0.is_match(text.inner()))))
}

pub(super) static REGEX_TYPE: Type = Type::simple_type(Kind::Opaque, "metropolis.filter.Regex");

/// A `matches()` pattern compiled with the filter.
#[derive(Debug, Clone)]
pub(super) struct RegexVal(pub(super) regex::Regex);

impl Val for RegexVal {
    fn get_type(&self) -> &Type {
        &REGEX_TYPE
    }
    fn cel_type() -> &'static Type {
        &REGEX_TYPE
    }
    fn clone_as_boxed<'v>(&self) -> Box<dyn Val + 'v> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}
impl StaticVal for RegexVal {}

pub(super) static PRESENCE_TYPE: Type =
    Type::simple_type(Kind::Opaque, "metropolis.filter.Presence");

/// Asks a message for the presence of a field. No expression can produce one,
/// so presence cannot leak into ordinary reads.
#[derive(Debug, Clone)]
pub(super) struct PresenceQuery(pub(super) Cow<'static, str>);

impl Val for PresenceQuery {
    fn get_type(&self) -> &Type {
        &PRESENCE_TYPE
    }
    fn cel_type() -> &'static Type {
        &PRESENCE_TYPE
    }
    fn clone_as_boxed<'v>(&self) -> Box<dyn Val + 'v> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}
impl StaticVal for PresenceQuery {}

/// Binds `node` in a node's scope without copying or allocating.
pub(super) struct NodeVar<'a>(pub(super) Msg<'a, api::Node>);

impl VariableResolver for NodeVar<'_> {
    fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
        (variable == NODE_VAR).then(|| CowVal::Borrowed(&self.0 as &dyn Val))
    }
}

// ---------------------------------------------------------------------------
// Messages

/// What compiling needs to know about a message type.
#[derive(Clone, Copy)]
pub(super) struct MessageInfo {
    pub(super) name: &'static str,
    pub(super) fields: &'static [&'static str],
    pub(super) field_kind: fn(&str) -> Option<FieldKind>,
}

#[derive(Clone, Copy)]
pub(super) enum FieldKind {
    Scalar(&'static str),
    Duration,
    Timestamp,
    Message(MessageInfo),
    Repeated(MessageInfo),
}

/// A protobuf message type as filters see it.
pub(super) trait Message: fmt::Debug + Send + Sync + Sized + 'static {
    const INFO: MessageInfo;
    fn cel_type() -> &'static Type;
    /// The value an unset field of this type reads as.
    fn default_instance() -> &'static Self;
    /// The field's value; `None` for a field the type does not have.
    fn field(&self, name: &str) -> Option<Result<Box<dyn Val + '_>, ExecutionError>>;
    /// Whether the field is set, as proto3 defines it.
    fn present(&self, name: &str) -> Option<bool>;
}

/// How one Rust field type reads in CEL.
pub(super) trait FieldType {
    const KIND: FieldKind;
    fn value(&self) -> Result<Box<dyn Val + '_>, ExecutionError>;
    fn present(&self) -> bool;
}

impl FieldType for String {
    const KIND: FieldKind = FieldKind::Scalar("string");
    fn value(&self) -> Result<Box<dyn Val + '_>, ExecutionError> {
        Ok(Box::new(CelString::from(self.as_str())))
    }
    fn present(&self) -> bool {
        !self.is_empty()
    }
}

impl FieldType for Vec<u8> {
    const KIND: FieldKind = FieldKind::Scalar("bytes");
    fn value(&self) -> Result<Box<dyn Val + '_>, ExecutionError> {
        Ok(Box::new(CelBytes::from(self.as_slice())))
    }
    fn present(&self) -> bool {
        !self.is_empty()
    }
}

/// Enums are ints in CEL, like `int32`.
impl FieldType for i32 {
    const KIND: FieldKind = FieldKind::Scalar("int");
    fn value(&self) -> Result<Box<dyn Val + '_>, ExecutionError> {
        Ok(Box::new(CelInt::from(i64::from(*self))))
    }
    fn present(&self) -> bool {
        *self != 0
    }
}

impl FieldType for i64 {
    const KIND: FieldKind = FieldKind::Scalar("int");
    fn value(&self) -> Result<Box<dyn Val + '_>, ExecutionError> {
        Ok(Box::new(CelInt::from(*self)))
    }
    fn present(&self) -> bool {
        *self != 0
    }
}

impl FieldType for u64 {
    const KIND: FieldKind = FieldKind::Scalar("uint");
    fn value(&self) -> Result<Box<dyn Val + '_>, ExecutionError> {
        Ok(Box::new(CelUInt::from(*self)))
    }
    fn present(&self) -> bool {
        *self != 0
    }
}

impl<M: Message> FieldType for Option<M> {
    const KIND: FieldKind = FieldKind::Message(M::INFO);
    fn value(&self) -> Result<Box<dyn Val + '_>, ExecutionError> {
        Ok(Box::new(Msg(self
            .as_ref()
            .unwrap_or_else(|| M::default_instance()))))
    }
    fn present(&self) -> bool {
        self.is_some()
    }
}

impl<M: Message> FieldType for Vec<M> {
    const KIND: FieldKind = FieldKind::Repeated(M::INFO);
    fn value(&self) -> Result<Box<dyn Val + '_>, ExecutionError> {
        let elements: Vec<Box<dyn Val + '_>> = self
            .iter()
            .map(|m| Box::new(Msg(m)) as Box<dyn Val + '_>)
            .collect();
        Ok(Box::new(CelList::from(elements)))
    }
    fn present(&self) -> bool {
        !self.is_empty()
    }
}

impl FieldType for Option<prost_types::Duration> {
    const KIND: FieldKind = FieldKind::Duration;
    fn value(&self) -> Result<Box<dyn Val + '_>, ExecutionError> {
        let d = self.unwrap_or_default();
        let out_of_range = || {
            ExecutionError::function_error(
                "duration",
                format!("{}s {}ns is out of range", d.seconds, d.nanos),
            )
        };
        let seconds = chrono::TimeDelta::try_seconds(d.seconds).ok_or_else(out_of_range)?;
        let total = seconds
            .checked_add(&chrono::TimeDelta::nanoseconds(i64::from(d.nanos)))
            .ok_or_else(out_of_range)?;
        Ok(Box::new(CelDuration::from(total)))
    }
    fn present(&self) -> bool {
        self.is_some()
    }
}

impl FieldType for Option<prost_types::Timestamp> {
    const KIND: FieldKind = FieldKind::Timestamp;
    fn value(&self) -> Result<Box<dyn Val + '_>, ExecutionError> {
        let t = self.unwrap_or_default();
        let nanos = u32::try_from(t.nanos).ok();
        let time = nanos
            .and_then(|n| chrono::DateTime::from_timestamp(t.seconds, n))
            .ok_or_else(|| {
                ExecutionError::function_error(
                    "timestamp",
                    format!("{}s {}ns is out of range", t.seconds, t.nanos),
                )
            })?;
        Ok(Box::new(CelTimestamp::from(time.fixed_offset())))
    }
    fn present(&self) -> bool {
        self.is_some()
    }
}

pub(super) fn kind_of<M, F: FieldType>(_: fn(&M) -> &F) -> FieldKind {
    F::KIND
}

/// Implements [`Message`] from the list of a type's fields. The struct
/// pattern fails to compile when a proto gains a field this list lacks, so
/// filters cannot silently miss new fields.
macro_rules! messages {
    ($($ty:path = $name:literal { $($field:ident),* $(,)? })*) => {$(
        impl Message for $ty {
            const INFO: MessageInfo = MessageInfo {
                name: $name,
                fields: &[$(stringify!($field)),*],
                field_kind: |name| match name {
                    $(stringify!($field) => Some(kind_of(|m: &$ty| &m.$field)),)*
                    _ => None,
                },
            };
            fn cel_type() -> &'static Type {
                static TYPE: Type = Type::new_struct_type($name);
                &TYPE
            }
            fn default_instance() -> &'static Self {
                static DEFAULT: LazyLock<$ty> = LazyLock::new(Default::default);
                &DEFAULT
            }
            fn field(&self, name: &str) -> Option<Result<Box<dyn Val + '_>, ExecutionError>> {
                let $ty { $($field),* } = self;
                match name {
                    $(stringify!($field) => Some(FieldType::value($field)),)*
                    _ => None,
                }
            }
            fn present(&self, name: &str) -> Option<bool> {
                let $ty { $($field),* } = self;
                match name {
                    $(stringify!($field) => Some(FieldType::present($field)),)*
                    _ => None,
                }
            }
        }
    )*};
}

messages! {
    api::Node = "metropolis.proto.api.Node" {
        pubkey, id, state, status, roles, health, time_since_heartbeat, tpm_usage, labels,
        consensus_progress,
    }
    common::NodeStatus = "metropolis.proto.common.NodeStatus" {
        external_address, running_curator, timestamp, version, boot_id,
    }
    node_status::RunningCurator = "metropolis.proto.common.NodeStatus.RunningCurator" {
        port,
    }
    version_spec::Version = "version.spec.Version" { release, git_information, binary_sha256 }
    version::Release = "version.spec.Version.Release" { major, minor, patch }
    version::GitInformation = "version.spec.Version.GitInformation" {
        commit_hash, commits_since_release, build_tree_state,
    }
    common::NodeRoles = "metropolis.proto.common.NodeRoles" {
        kubernetes_worker, consensus_member, kubernetes_controller,
    }
    node_roles::KubernetesWorker = "metropolis.proto.common.NodeRoles.KubernetesWorker" {}
    node_roles::KubernetesController =
        "metropolis.proto.common.NodeRoles.KubernetesController" {}
    node_roles::ConsensusMember = "metropolis.proto.common.NodeRoles.ConsensusMember" {
        ca_certificate, peer_certificate, initial_crl, peers,
    }
    consensus_member::Peer = "metropolis.proto.common.NodeRoles.ConsensusMember.Peer" {
        name, url,
    }
    common::NodeLabels = "metropolis.proto.common.NodeLabels" { pairs }
    node_labels::Pair = "metropolis.proto.common.NodeLabels.Pair" { key, value }
}

/// A message borrowed from the caller, read field by field on demand.
#[derive(Debug)]
pub(super) struct Msg<'a, M>(pub(super) &'a M);

impl<M> Clone for Msg<'_, M> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<M> Copy for Msg<'_, M> {}

impl<'a, M: Message> Msg<'a, M> {
    pub(super) fn no_such_field(name: &str) -> ExecutionError {
        ExecutionError::no_such_key(&format!("{name} (not a field of {})", M::INFO.name))
    }
}

impl<'a, M: Message> Val for Msg<'a, M> {
    fn get_type(&self) -> &Type {
        M::cel_type()
    }

    fn cel_type() -> &'static Type {
        M::cel_type()
    }

    fn as_indexer<'b, 'v>(&'b self) -> Option<&'b (dyn Indexer + 'v)>
    where
        Self: 'v,
    {
        Some(self)
    }

    /// Protobuf equality: same type, same presence and same value for every
    /// field.
    fn equals(&self, other: &dyn Val) -> bool {
        if other.get_type() != self.get_type() {
            return false;
        }
        let Some(other) = other.as_indexer() else {
            return false;
        };
        M::INFO.fields.iter().all(|&name| {
            let present = other
                .get(&PresenceQuery(Cow::Borrowed(name)))
                .ok()
                .and_then(|p| p.downcast_ref::<CelBool>().map(|b| *b.inner()));
            if present != self.0.present(name) {
                return false;
            }
            match (self.0.field(name), other.get(&CelString::from(name))) {
                (Some(Ok(mine)), Ok(theirs)) => mine.equals(theirs.as_ref()),
                _ => false,
            }
        })
    }

    fn clone_as_boxed<'v>(&self) -> Box<dyn Val + 'v>
    where
        Self: 'v,
    {
        Box::new(*self)
    }
}

impl<'a, M: Message> Indexer for Msg<'a, M> {
    fn get<'b, 'v>(&'b self, idx: &dyn Val) -> Result<CowVal<'b, 'v>, ExecutionError>
    where
        Self: 'v,
    {
        if let Some(name) = idx.downcast_ref::<CelString>() {
            let name = name.inner();
            return match self.0.field(name) {
                Some(value) => value.map(CowVal::Owned),
                None => Err(Self::no_such_field(name)),
            };
        }
        if let Some(PresenceQuery(name)) = idx.downcast_ref::<PresenceQuery>() {
            return match self.0.present(name) {
                Some(present) => Ok(CowVal::owned(CelBool::from(present))),
                None => Err(Self::no_such_field(name)),
            };
        }
        Err(ExecutionError::UnexpectedType {
            got: idx.get_type().name().to_owned(),
            want: "string".to_owned(),
        })
    }

    fn steal<'v>(self: Box<Self>, idx: &dyn Val) -> Result<Box<dyn Val + 'v>, ExecutionError>
    where
        Self: 'v,
    {
        self.get(idx).map(CowVal::into_owned)
    }
}
