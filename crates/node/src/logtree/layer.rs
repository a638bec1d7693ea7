//! Leveled entries from `tracing`: the subscriber layer.

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::SystemTime;

use metropolis_api::osbase::logtree::proto::LeveledLogSeverity;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber, span};
use tracing_subscriber::layer::{Context as LayerContext, Layer};
use tracing_subscriber::registry::LookupSpan;

use super::{
    Kind, LEVELED_MESSAGE_MAX, Location, LogTree, ROOT_DN, floor_char_boundary, is_valid_segment,
    validate_dn,
};

/// The layer caches target → DN; targets are static callsite data, so this
/// is only a guard against something generating targets.
const TARGET_CACHE_MAX: usize = 4096;

/// A `tracing_subscriber` layer that appends events to the tree as leveled
/// entries.
///
/// - DN: an event field `dn`, else the `dn` field of the innermost span that
///   has one, else the target: `metropolis_node::<module>::…` →
///   `root.<module>`, `metropolis_<crate>::…` → `root.<crate>`, anything else
///   → `root`. A `dn` that is not a valid DN is ignored (and not rendered).
/// - Severity: ERROR → ERROR, WARN → WARNING, INFO/DEBUG/TRACE → INFO.
///   DEBUG and TRACE are skipped unless [`LogTreeLayer::with_max_level`]
///   lets them in. (Filtering here rather than in `Layer::enabled` keeps the
///   other layers' verbosity independent.)
/// - Text: the message, then the event's other fields as ` key=value`
///   (strings with spaces or quotes in quotes); span fields are not included.
/// - Location: the source file's name and line, `membership.rs:123`.
pub struct LogTreeLayer {
    tree: Arc<LogTree>,
    max_level: Level,
    targets: RwLock<HashMap<&'static str, Arc<str>>>,
}

impl LogTreeLayer {
    pub fn new(tree: Arc<LogTree>) -> Self {
        LogTreeLayer {
            tree,
            max_level: Level::INFO,
            targets: RwLock::new(HashMap::new()),
        }
    }

    /// The most verbose level kept (default INFO).
    pub fn with_max_level(mut self, level: Level) -> Self {
        self.max_level = level;
        self
    }

    fn target_dn(&self, target: &'static str) -> Arc<str> {
        let cached = self
            .targets
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(target)
            .cloned();
        if let Some(dn) = cached {
            return dn;
        }
        let dn: Arc<str> = Arc::from(dn_for_target(target));
        let mut targets = self.targets.write().unwrap_or_else(PoisonError::into_inner);
        if targets.len() < TARGET_CACHE_MAX {
            targets.insert(target, dn.clone());
        }
        dn
    }
}

pub(super) fn dn_for_target(target: &str) -> String {
    let mut parts = target.split("::");
    let krate = parts.next().unwrap_or_default();
    let segment = if krate == "metropolis_node" {
        parts.next()
    } else {
        krate.strip_prefix("metropolis_")
    };
    match segment {
        Some(seg) if is_valid_segment(seg) => format!("{ROOT_DN}.{seg}"),
        _ => ROOT_DN.to_owned(),
    }
}

pub(super) fn severity_for(level: &Level) -> LeveledLogSeverity {
    match *level {
        Level::ERROR => LeveledLogSeverity::Error,
        Level::WARN => LeveledLogSeverity::Warning,
        _ => LeveledLogSeverity::Info,
    }
}

/// A DN attached to a span through its `dn` field.
struct SpanDn(Arc<str>);

/// Collects only the `dn` field of a span.
#[derive(Default)]
struct DnVisitor(Option<String>);

impl Visit for DnVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "dn" {
            self.0 = Some(value.to_owned());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "dn" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

/// A string that stops growing at its limit, so rendering a huge field
/// cannot allocate without bound.
struct Bounded {
    text: String,
    limit: usize,
    cut: usize,
}

impl Bounded {
    fn new(limit: usize) -> Self {
        Bounded {
            text: String::new(),
            limit,
            cut: 0,
        }
    }
}

impl fmt::Write for Bounded {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.limit.saturating_sub(self.text.len());
        let keep = floor_char_boundary(s, room);
        self.text.push_str(&s[..keep]);
        self.cut += s.len() - keep;
        Ok(())
    }
}

struct EventVisitor {
    message: Bounded,
    /// Separate from `message` because the message field need not come
    /// first, but is rendered first.
    fields: Bounded,
    dn: Option<String>,
}

impl EventVisitor {
    fn field(&mut self, field: &Field) -> bool {
        let name = field.name();
        // `log.*` fields are tracing-log's copy of the metadata.
        if name == "dn" || name.starts_with("log.") {
            return false;
        }
        let _ = write!(self.fields, " {name}=");
        true
    }

    fn into_text(self) -> String {
        let EventVisitor {
            message, fields, ..
        } = self;
        let cut = message.cut + fields.cut;
        let mut text = message.text;
        if text.is_empty() {
            text.push_str(fields.text.trim_start());
        } else {
            text.push_str(&fields.text);
        }
        if cut > 0 || text.len() > LEVELED_MESSAGE_MAX {
            let total = text.len() + cut;
            text.truncate(floor_char_boundary(&text, LEVELED_MESSAGE_MAX));
            let _ = write!(text, "\n(message cut: {total} bytes in total)");
        }
        text
    }
}

impl Visit for EventVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            let _ = self.message.write_str(value);
        } else if field.name() == "dn" {
            self.dn = Some(value.to_owned());
        } else if self.field(field) {
            let plain = !value.is_empty()
                && !value
                    .chars()
                    .any(|c| c.is_whitespace() || c == '"' || c == '=' || c.is_control());
            let _ = if plain {
                self.fields.write_str(value)
            } else {
                write!(self.fields, "{value:?}")
            };
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else if field.name() == "dn" {
            self.dn = Some(format!("{value:?}"));
        } else if self.field(field) {
            let _ = write!(self.fields, "{value:?}");
        }
    }
}

impl<S> Layer<S> for LogTreeLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: LayerContext<'_, S>) {
        let mut visitor = DnVisitor::default();
        attrs.record(&mut visitor);
        if let (Some(dn), Some(span)) = (visitor.0, ctx.span(id))
            && validate_dn(&dn).is_ok()
        {
            span.extensions_mut().insert(SpanDn(Arc::from(dn)));
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: LayerContext<'_, S>) {
        let mut visitor = DnVisitor::default();
        values.record(&mut visitor);
        if let (Some(dn), Some(span)) = (visitor.0, ctx.span(id))
            && validate_dn(&dn).is_ok()
        {
            span.extensions_mut().replace(SpanDn(Arc::from(dn)));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: LayerContext<'_, S>) {
        let meta = event.metadata();
        if *meta.level() > self.max_level {
            return;
        }
        let mut visitor = EventVisitor {
            message: Bounded::new(LEVELED_MESSAGE_MAX),
            fields: Bounded::new(LEVELED_MESSAGE_MAX),
            dn: None,
        };
        event.record(&mut visitor);
        let event_dn = visitor.dn.take().filter(|dn| validate_dn(dn).is_ok());
        let location = match (meta.file(), meta.line()) {
            (Some(file), Some(line)) => Location::Static {
                file: file.rsplit(['/', '\\']).next().unwrap_or(file),
                line,
            },
            _ => Location::None,
        };
        let kind = Kind::Leveled {
            time: SystemTime::now(),
            severity: severity_for(meta.level()),
            location,
            message: visitor.into_text(),
        };
        if let Some(dn) = event_dn {
            self.tree.push(&dn, kind);
            return;
        }
        let span_dn = ctx.event_scope(event).and_then(|scope| {
            scope
                .into_iter()
                .find_map(|span| span.extensions().get::<SpanDn>().map(|d| d.0.clone()))
        });
        let dn = span_dn.unwrap_or_else(|| self.target_dn(meta.target()));
        self.tree.push(&dn, kind);
    }
}

impl fmt::Debug for LogTreeLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogTreeLayer")
            .field("max_level", &self.max_level)
            .finish_non_exhaustive()
    }
}
