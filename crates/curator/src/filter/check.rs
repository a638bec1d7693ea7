//! The compile pass: names, fields and types checked, `has()` rewritten,
//! constants inlined and the cost of a filter estimated.

use super::*;

/// What compiling knows about the type of an expression.
#[derive(Clone, Copy)]
pub(super) enum Static {
    Unknown,
    Bool,
    /// A CEL type without fields: `int`, `string`, `list`, ...
    Scalar(&'static str),
    Duration,
    Timestamp,
    Message(MessageInfo),
    Repeated(MessageInfo),
    /// A type name such as `int`, used as a value.
    TypeName,
}

impl Static {
    pub(super) fn describe(&self) -> String {
        match self {
            Static::Unknown => "unknown".to_owned(),
            Static::Bool => "bool".to_owned(),
            Static::Scalar(t) => (*t).to_owned(),
            Static::Duration => "google.protobuf.Duration".to_owned(),
            Static::Timestamp => "google.protobuf.Timestamp".to_owned(),
            Static::Message(m) => m.name.to_owned(),
            Static::Repeated(m) => format!("list({})", m.name),
            Static::TypeName => "type".to_owned(),
        }
    }
}

impl From<FieldKind> for Static {
    fn from(kind: FieldKind) -> Self {
        match kind {
            FieldKind::Scalar(t) => Static::Scalar(t),
            FieldKind::Duration => Static::Duration,
            FieldKind::Timestamp => Static::Timestamp,
            FieldKind::Message(m) => Static::Message(m),
            FieldKind::Repeated(m) => Static::Repeated(m),
        }
    }
}

/// The static type, estimated evaluation steps and, for lists and maps, the
/// estimated length of an expression.
pub(super) struct Info {
    pub(super) kind: Static,
    pub(super) cost: u64,
    pub(super) len: u64,
}

impl Info {
    /// Only lists and maps have a length that matters to the cost estimate:
    /// a `+` of two ints is not a concatenation.
    pub(super) fn sized(self) -> Info {
        let container = match self.kind {
            Static::Unknown | Static::Repeated(_) => true,
            Static::Scalar(t) => t == "list",
            _ => false,
        };
        Info {
            len: if container { self.len } else { 1 },
            ..self
        }
    }
}

pub(super) struct Checker {
    /// Comprehension variables in scope, innermost last.
    pub(super) scope: Vec<(String, Static, u64)>,
    pub(super) regexes: Vec<regex::Regex>,
    /// Length assumed for lists compiling cannot size.
    pub(super) unknown_len: u64,
    /// A throwaway context: adding a function to it fails exactly when the
    /// environment declares one of that name, the only public way to ask.
    pub(super) probe: Context<'static, 'static>,
}

impl Checker {
    pub(super) fn bound(&self, name: &str) -> Option<(Static, u64)> {
        self.scope
            .iter()
            .rev()
            .find(|(n, _, _)| n == name)
            .map(|(_, kind, len)| (*kind, *len))
    }

    pub(super) fn declared_function(&mut self, name: &str) -> bool {
        self.probe.add_function(name, |x: i64| x).is_err()
    }

    pub(super) fn leaf(&self, kind: Static) -> Info {
        Info {
            kind,
            cost: 1,
            len: self.unknown_len,
        }
    }

    /// Checks and rewrites `e` in place; returns what it learned.
    ///
    /// This recurses once per tree level, so it stays a thin dispatcher: in
    /// unoptimized builds every local of every arm would otherwise take stack
    /// space in each frame (12 KiB per level when it was one function).
    pub(super) fn walk(&mut self, e: &mut IdedExpr) -> Result<Info, FilterError> {
        let info = match &e.expr {
            Expr::Literal(literal) => Ok(literal_info(literal)),
            Expr::Ident(_) => self.walk_ident(e),
            Expr::Select(select) if select.test => self.walk_has(e),
            Expr::Select(_) => self.walk_select(e),
            Expr::Call(_) => self.walk_call(e),
            Expr::Comprehension(_) => self.walk_comprehension(e),
            Expr::List(_) => self.walk_list(e),
            Expr::Map(_) => self.walk_map(e),
            Expr::Struct(_) => Err(unsupported("a message literal")),
            Expr::Unspecified => Err(FilterError::Syntax {
                message: "empty expression".to_owned(),
            }),
        };
        info.map(Info::sized)
    }

    #[inline(never)]
    pub(super) fn walk_ident(&mut self, e: &mut IdedExpr) -> Result<Info, FilterError> {
        let Expr::Ident(name) = &e.expr else {
            return Ok(self.leaf(Static::Unknown));
        };
        if let Some((kind, len)) = self.bound(name) {
            return Ok(Info { kind, cost: 1, len });
        }
        if name == NODE_VAR {
            return Ok(self.leaf(Static::Message(api::Node::INFO)));
        }
        // Names of this module's own making, such as compiled patterns.
        if name.starts_with('@') {
            return Ok(self.leaf(Static::Unknown));
        }
        if let Some(value) = constant(name) {
            // Inlined: one lookup less per evaluation.
            e.expr = Expr::Literal(LiteralValue::Int(CelInt::from(value)));
            return Ok(self.leaf(Static::Scalar("int")));
        }
        if ENV.types().find_type(name).is_some() {
            return Ok(self.leaf(Static::TypeName));
        }
        Err(unknown_identifier(name))
    }

    /// `has(x.f)`, which becomes `@has(x, "f")`.
    #[inline(never)]
    pub(super) fn walk_has(&mut self, e: &mut IdedExpr) -> Result<Info, FilterError> {
        let id = e.id;
        let Expr::Select(select) = &mut e.expr else {
            return Ok(self.leaf(Static::Unknown));
        };
        let operand = self.walk(&mut select.operand)?;
        check_field(operand.kind, &select.operand, &select.field)?;
        let field = std::mem::take(&mut select.field);
        let target = std::mem::take(&mut *select.operand);
        e.expr = Expr::Call(CallExpr {
            func_name: HAS_FN.to_owned(),
            target: None,
            args: vec![
                target,
                IdedExpr {
                    id,
                    expr: Expr::Literal(LiteralValue::String(CelString::from(field))),
                },
            ],
        });
        Ok(Info {
            kind: Static::Bool,
            cost: operand.cost.saturating_add(2),
            len: 1,
        })
    }

    #[inline(never)]
    pub(super) fn walk_select(&mut self, e: &mut IdedExpr) -> Result<Info, FilterError> {
        let Expr::Select(select) = &mut e.expr else {
            return Ok(self.leaf(Static::Unknown));
        };
        if self.names_type(&select.operand, &select.field) {
            return Ok(self.leaf(Static::TypeName));
        }
        let operand = self.walk(&mut select.operand)?;
        let kind = check_field(operand.kind, &select.operand, &select.field)?;
        let len = match kind {
            Static::Repeated(_) => ASSUMED_NODE_LIST_LEN,
            _ => self.unknown_len,
        };
        Ok(Info {
            kind,
            cost: operand.cost.saturating_add(1),
            len,
        })
    }

    #[inline(never)]
    pub(super) fn walk_call(&mut self, e: &mut IdedExpr) -> Result<Info, FilterError> {
        let Expr::Call(call) = &mut e.expr else {
            return Ok(self.leaf(Static::Unknown));
        };
        let rewritten = self.rewrite_matches(call)?;
        // Arguments first: `optional.of(1)` is better reported as an unknown
        // `optional` than as an unknown `of`.
        let mut infos = Vec::with_capacity(call.args.len() + 1);
        if let Some(target) = &mut call.target {
            infos.push(self.walk(target)?);
        }
        for arg in &mut call.args {
            infos.push(self.walk(arg)?);
        }
        let name = call.func_name.as_str();
        let identifier_like = name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if identifier_like && !rewritten && !self.declared_function(name) {
            return Err(unknown_function(name));
        }
        Ok(self.call_info(name, &infos))
    }

    #[inline(never)]
    pub(super) fn walk_comprehension(&mut self, e: &mut IdedExpr) -> Result<Info, FilterError> {
        let Expr::Comprehension(comprehension) = &mut e.expr else {
            return Ok(self.leaf(Static::Unknown));
        };
        let range = self.walk(&mut comprehension.iter_range)?;
        let init = self.walk(&mut comprehension.accu_init)?;
        let element = match range.kind {
            Static::Repeated(info) => Static::Message(info),
            _ => Static::Unknown,
        };
        let unknown_len = self.unknown_len;
        let outer = self.scope.len();
        self.scope
            .push((comprehension.iter_var.clone(), element, unknown_len));
        if let Some(var) = &comprehension.iter_var2 {
            self.scope.push((var.clone(), Static::Unknown, unknown_len));
        }
        self.scope
            .push((comprehension.accu_var.clone(), Static::Unknown, unknown_len));
        let cond = self.walk(&mut comprehension.loop_cond);
        let step = cond.and_then(|cond| Ok((cond, self.walk(&mut comprehension.loop_step)?)));
        let body =
            step.and_then(|(cond, step)| Ok((cond, step, self.walk(&mut comprehension.result)?)));
        self.scope.truncate(outer);
        let (cond, step, result) = body?;
        let per_element = cond.cost.saturating_add(step.cost).saturating_add(1);
        Ok(Info {
            kind: Static::Unknown,
            cost: range
                .cost
                .saturating_add(init.cost)
                .saturating_add(range.len.saturating_mul(per_element))
                .saturating_add(result.cost),
            len: range.len,
        })
    }

    #[inline(never)]
    pub(super) fn walk_list(&mut self, e: &mut IdedExpr) -> Result<Info, FilterError> {
        let Expr::List(list) = &mut e.expr else {
            return Ok(self.leaf(Static::Unknown));
        };
        let mut cost: u64 = 1;
        for element in &mut list.elements {
            cost = cost.saturating_add(self.walk(element)?.cost);
        }
        Ok(Info {
            kind: Static::Scalar("list"),
            cost,
            len: list.elements.len() as u64,
        })
    }

    #[inline(never)]
    pub(super) fn walk_map(&mut self, e: &mut IdedExpr) -> Result<Info, FilterError> {
        let Expr::Map(map) = &mut e.expr else {
            return Ok(self.leaf(Static::Unknown));
        };
        let mut cost: u64 = 1;
        for entry in &mut map.entries {
            let EntryExpr::MapEntry(entry) = &mut entry.expr else {
                return Err(unsupported("a message literal"));
            };
            cost = cost.saturating_add(self.walk(&mut entry.key)?.cost);
            cost = cost.saturating_add(self.walk(&mut entry.value)?.cost);
        }
        // Unknown rather than "map": maps have fields (`{'a': 1}.a`).
        Ok(Info {
            kind: Static::Unknown,
            cost,
            len: map.entries.len() as u64,
        })
    }

    /// Whether `operand.field` spells a type name such as
    /// `google.protobuf.Duration`, rooted in none of the filter's own names.
    pub(super) fn names_type(&self, operand: &IdedExpr, field: &str) -> bool {
        let mut segments = vec![field];
        let mut expr = operand;
        loop {
            match &expr.expr {
                Expr::Select(s) if !s.test => {
                    segments.push(&s.field);
                    expr = &s.operand;
                }
                Expr::Ident(root) => {
                    if self.bound(root).is_some() || root == NODE_VAR || constant(root).is_some() {
                        return false;
                    }
                    segments.push(root);
                    segments.reverse();
                    return ENV.types().find_type(&segments.join(".")).is_some();
                }
                _ => return false,
            }
        }
    }

    /// Rewrites `s.matches("literal")` and `matches(s, "literal")` to use a
    /// pattern compiled here. Returns whether it did.
    pub(super) fn rewrite_matches(&mut self, call: &mut CallExpr) -> Result<bool, FilterError> {
        let arity_ok = match call.target {
            Some(_) => call.args.len() == 1,
            None => call.args.len() == 2,
        };
        if call.func_name != "matches" || !arity_ok {
            return Ok(false);
        }
        let Some(pattern) = call.args.last_mut() else {
            return Ok(false);
        };
        let Expr::Literal(LiteralValue::String(text)) = &pattern.expr else {
            return Err(FilterError::DynamicPattern);
        };
        let regex = regex::RegexBuilder::new(text.inner())
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|e| FilterError::InvalidPattern {
                pattern: text.inner().to_owned(),
                message: e.to_string(),
            })?;
        pattern.expr = Expr::Ident(regex_var(self.regexes.len()));
        self.regexes.push(regex);
        if let Some(target) = call.target.take() {
            call.args.insert(0, *target);
        }
        call.func_name = MATCHES_FN.to_owned();
        Ok(true)
    }

    pub(super) fn call_info(&self, name: &str, args: &[Info]) -> Info {
        let mut cost: u64 = 1;
        for arg in args {
            cost = cost.saturating_add(arg.cost);
        }
        let kind_of = |i: usize| args.get(i).map_or(Static::Unknown, |a| a.kind);
        let len_of = |i: usize| args.get(i).map_or(self.unknown_len, |a| a.len);
        let mut len = self.unknown_len;
        let kind = match name {
            operators::LOGICAL_AND
            | operators::LOGICAL_OR
            | operators::LOGICAL_NOT
            | operators::NOT_STRICTLY_FALSE
            | operators::LESS
            | operators::LESS_EQUALS
            | operators::GREATER
            | operators::GREATER_EQUALS
            | HAS_FN
            | MATCHES_FN => Static::Bool,
            operators::EQUALS | operators::NOT_EQUALS => {
                // Comparing lists or maps walks them.
                cost = cost.saturating_add(len_of(0).min(len_of(1)));
                Static::Bool
            }
            operators::IN => {
                cost = cost.saturating_add(len_of(1));
                Static::Bool
            }
            operators::ADD => {
                // Concatenating lists copies them.
                len = len_of(0).saturating_add(len_of(1));
                cost = cost.saturating_add(len);
                match (kind_of(0), kind_of(1)) {
                    (Static::Scalar(a), Static::Scalar(b)) if a == b => Static::Scalar(a),
                    (Static::Duration, Static::Duration) => Static::Duration,
                    _ => Static::Unknown,
                }
            }
            operators::SUBSTRACT
            | operators::MULTIPLY
            | operators::DIVIDE
            | operators::MODULO
            | operators::NEGATE => match (kind_of(0), args.get(1).map(|a| a.kind)) {
                (Static::Scalar(a), None) => Static::Scalar(a),
                (Static::Scalar(a), Some(Static::Scalar(b))) if a == b => Static::Scalar(a),
                _ => Static::Unknown,
            },
            operators::CONDITIONAL => {
                len = len_of(1).max(len_of(2));
                Static::Unknown
            }
            operators::INDEX => match kind_of(0) {
                Static::Repeated(info) => Static::Message(info),
                _ => Static::Unknown,
            },
            "size" => Static::Scalar("int"),
            _ => Static::Unknown,
        };
        Info { kind, cost, len }
    }
}

pub(super) fn literal_info(literal: &LiteralValue) -> Info {
    let kind = match literal {
        LiteralValue::Boolean(_) => Static::Bool,
        LiteralValue::Bytes(_) => Static::Scalar("bytes"),
        LiteralValue::Double(_) => Static::Scalar("double"),
        LiteralValue::Int(_) => Static::Scalar("int"),
        LiteralValue::Null => Static::Scalar("null_type"),
        LiteralValue::String(_) => Static::Scalar("string"),
        LiteralValue::UInt(_) => Static::Scalar("uint"),
    };
    Info {
        kind,
        cost: 1,
        len: 1,
    }
}

/// The static type of `operand.field`, or why it has none.
pub(super) fn check_field(
    operand_kind: Static,
    operand: &IdedExpr,
    field: &str,
) -> Result<Static, FilterError> {
    match operand_kind {
        Static::Message(info) => field_of(info, operand, field).map(Static::from),
        Static::Unknown => Ok(Static::Unknown),
        other => Err(not_a_message(operand, other, field)),
    }
}

#[cold]
#[inline(never)]
pub(super) fn unsupported(what: &str) -> FilterError {
    FilterError::Unsupported {
        what: what.to_owned(),
    }
}

#[cold]
#[inline(never)]
pub(super) fn unknown_function(name: &str) -> FilterError {
    FilterError::UnknownFunction {
        name: name.to_owned(),
    }
}

pub(super) fn field_of(
    info: MessageInfo,
    operand: &IdedExpr,
    field: &str,
) -> Result<FieldKind, FilterError> {
    (info.field_kind)(field).ok_or_else(|| FilterError::UnknownField {
        path: describe_path(operand),
        field: field.to_owned(),
        fields: info.fields.join(", "),
    })
}

#[cold]
#[inline(never)]
pub(super) fn not_a_message(operand: &IdedExpr, kind: Static, field: &str) -> FilterError {
    let hint = match kind {
        Static::Repeated(_) => format!(
            "; it is a list, so test its elements, e.g. `{}.exists(x, x.{field} == ...)`",
            describe_path(operand)
        ),
        _ => String::new(),
    };
    FilterError::NotAMessage {
        path: describe_path(operand),
        kind: kind.describe(),
        field: field.to_owned(),
        hint,
    }
}

/// `node.status`, for messages about the expression; only simple paths are
/// spelled out.
pub(super) fn describe_path(e: &IdedExpr) -> String {
    match &e.expr {
        Expr::Ident(name) => name.clone(),
        Expr::Select(s) if !s.test => format!("{}.{}", describe_path(&s.operand), s.field),
        Expr::Call(c) if c.func_name == operators::INDEX && c.args.len() == 2 => {
            format!("{}[...]", describe_path(&c.args[0]))
        }
        _ => "the expression".to_owned(),
    }
}

#[cold]
#[inline(never)]
pub(super) fn unknown_identifier(name: &str) -> FilterError {
    let candidates = std::iter::once(NODE_VAR).chain(CONSTANTS.iter().map(|(n, _)| *n));
    let suggestion = candidates
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 5))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c);
    let hint = match suggestion {
        Some(c) => format!("did you mean `{c}`?"),
        None => "a filter can use `node` (the Node message), the NodeState and Health \
                 value names (NODE_STATE_UP, HEALTH_HEARTBEAT_TIMEOUT, ...) and variables \
                 it binds in macros such as exists()"
            .to_owned(),
    };
    FilterError::UnknownIdentifier {
        name: name.to_owned(),
        hint,
    }
}

pub(super) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}
