//! Canonical protobuf JSON mapping (enum names as strings, durations as
//! `"1.5s"`, bytes as base64) for any generated message, through the
//! descriptors compiled into this crate.

use std::sync::LazyLock;

use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

static POOL: LazyLock<Result<DescriptorPool, String>> = LazyLock::new(|| {
    DescriptorPool::decode(&include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"))[..])
        .map_err(|e| e.to_string())
});

/// The descriptors of every message in the contract.
pub fn descriptor_pool() -> Result<&'static DescriptorPool, String> {
    POOL.as_ref().map_err(Clone::clone)
}

/// Renders `msg` as a JSON value in the protobuf JSON mapping.
pub fn to_json<M: prost::Message + prost::Name>(msg: &M) -> Result<serde_json::Value, String> {
    let pool = descriptor_pool()?;
    let desc = pool
        .get_message_by_name(&M::full_name())
        .ok_or_else(|| format!("no descriptor for {}", M::full_name()))?;
    let dynamic =
        DynamicMessage::decode(desc, msg.encode_to_vec().as_slice()).map_err(|e| e.to_string())?;
    let opts = SerializeOptions::new().skip_default_fields(true);
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &opts)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Node, node::Health};
    use crate::common::NodeState;

    #[test]
    fn enums_and_durations_use_the_json_mapping() {
        let node = Node {
            id: "metropolis-00".into(),
            state: NodeState::Up as i32,
            health: Health::Healthy as i32,
            time_since_heartbeat: Some(prost_types::Duration {
                seconds: 1,
                nanos: 500_000_000,
            }),
            ..Default::default()
        };
        let v = to_json(&node).expect("json");
        assert_eq!(v["state"], "NODE_STATE_UP");
        assert_eq!(v["health"], "HEALTH_HEALTHY");
        assert_eq!(v["timeSinceHeartbeat"], "1.500s");
        assert_eq!(v["id"], "metropolis-00");
    }
}
