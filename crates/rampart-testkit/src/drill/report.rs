//! A drill's report as Markdown and as one self-contained HTML page: inline style, inline
//! SVG timelines, no script and nothing fetched, so it opens anywhere and can be attached
//! to a change ticket as it is.

use std::collections::BTreeMap;
use std::fmt::Write;

use rampart_core::drill::Scenario;
use serde::{Deserialize, Serialize};

use super::{PathFigures, Report, Step, BUCKET_MS};

/// The report as Markdown.
pub fn markdown(report: &Report) -> String {
    let mut lines = vec![
        "# Rampart drill".to_string(),
        String::new(),
        format!(
            "Budgets: RTO {} ms, RPO {} acknowledged writes. Result: **{}**.",
            report.budgets.rto_ms,
            report.budgets.rpo_writes,
            verdict(report)
        ),
    ];
    if let Some(why) = &report.aborted {
        lines.push(String::new());
        lines.push(format!("Stopped early: {why}"));
    }
    lines.extend([
        String::new(),
        "| scenario | fault | RTO | acknowledged | lost | within budget | checks |".to_string(),
        "|---|---|---|---|---|---|---|".to_string(),
    ]);
    for step in &report.steps {
        let checks: Vec<String> = step
            .checks
            .iter()
            .map(|c| format!("{} {}", if c.passed { "✓" } else { "✗" }, c.name))
            .collect();
        lines.push(format!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            step.scenario,
            step.fault,
            rto_text(step),
            step.acknowledged,
            step.lost,
            budget_text(step),
            checks.join("; ")
        ));
    }
    for step in report.steps.iter().filter(|s| s.reported_rpo.is_some()) {
        lines.push(String::new());
        lines.push(format!(
            "{}: the failover said: {}",
            step.scenario,
            step.reported_rpo.as_deref().unwrap_or_default()
        ));
    }
    lines.join("\n") + "\n"
}

fn verdict(report: &Report) -> &'static str {
    if report.passed {
        "passed"
    } else {
        "failed"
    }
}

fn budget_text(step: &Step) -> String {
    format!(
        "{} (RTO ≤ {} ms, RPO ≤ {})",
        if step.within_budget { "yes" } else { "no" },
        step.budgets.rto_ms,
        step.budgets.rpo_writes
    )
}

fn rto_text(step: &Step) -> String {
    step.rto_ms.map_or("no recovery".to_string(), |ms| format!("{ms} ms"))
}

/// Escapes text for HTML and SVG.
fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const WIDTH: f64 = 900.0;
const LEFT: f64 = 110.0;
const PLOT: f64 = WIDTH - LEFT - 20.0;
const PALETTE: [&str; 7] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#9c755f",
];

/// The report as one HTML page.
pub fn html(report: &Report) -> String {
    let mut page = String::new();
    let status_class = if report.passed { "pass" } else { "fail" };
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Rampart drill: {}</title>\n<style>{STYLE}</style></head><body>\n",
        verdict(report)
    );
    let _ = write!(
        page,
        "<h1>Rampart drill <span class=\"{status_class}\">{}</span></h1>\n<p>Scenarios: {}. Budgets: RTO {} ms, RPO {} acknowledged writes.</p>\n",
        verdict(report),
        esc(&report
            .scenarios
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(", ")),
        report.budgets.rto_ms,
        report.budgets.rpo_writes
    );
    if let Some(why) = &report.aborted {
        let _ = writeln!(page, "<p class=\"fail\">Stopped early: {}</p>", esc(why));
    }
    page.push_str("<table><tr><th>scenario</th><th>fault</th><th>RTO</th><th>acknowledged</th><th>lost</th><th>within budget</th><th>checks</th></tr>\n");
    for step in &report.steps {
        let failed = step.checks.iter().filter(|c| !c.passed).count();
        let _ = writeln!(
            page,
            "<tr><td><a href=\"#{0}-{1}\">{0}</a></td><td>{2}</td><td>{3}</td><td>{4}</td><td>{5}</td><td class=\"{6}\">{7}</td><td class=\"{8}\">{9}</td></tr>",
            step.scenario,
            step.injected_at_ms,
            esc(&step.fault),
            rto_text(step),
            step.acknowledged,
            step.lost,
            if step.within_budget { "pass" } else { "fail" },
            if step.within_budget { "yes" } else { "no" },
            if failed == 0 { "pass" } else { "fail" },
            if failed == 0 {
                format!("{} passed", step.checks.len())
            } else {
                format!("{failed} failed")
            }
        );
    }
    page.push_str("</table>\n");
    for step in &report.steps {
        page.push_str(&step_section(step));
    }
    page.push_str("</body></html>\n");
    page
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:960px}\
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}\
.pass{color:#1a7f37;font-weight:bold}.fail{color:#cf222e;font-weight:bold}\
svg{display:block;margin:0.5em 0;background:#fafafa;border:1px solid #eee}\
svg text{font-size:11px;fill:#333}h2{margin-top:2em}";

fn step_section(step: &Step) -> String {
    let budget_ms = step.budgets.rto_ms;
    let end_ms = step
        .marks
        .iter()
        .map(|m| m.at_ms)
        .chain(step.samples.iter().map(|s| s.at_ms))
        .chain(
            step.paths
                .iter()
                .filter_map(|p| p.writes.last())
                .map(|b| b.at_ms + BUCKET_MS),
        )
        .max()
        .unwrap_or(1)
        .max(1);
    let x = |ms: u64| LEFT + PLOT * ms as f64 / end_ms as f64;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<h2 id=\"{}-{}\">{}</h2>\n<p>{}. RTO <b>{}</b> (budget {} ms); RPO <b>{}</b> of {} acknowledged writes lost (budget {}).</p>",
        step.scenario,
        step.injected_at_ms,
        step.scenario,
        esc(&step.fault),
        rto_text(step),
        budget_ms,
        step.lost,
        step.acknowledged,
        step.budgets.rpo_writes
    );
    if let Some(rpo) = &step.reported_rpo {
        let _ = writeln!(out, "<p>The failover said: {}</p>", esc(rpo));
    }
    out.push_str("<ul>");
    for check in &step.checks {
        let _ = write!(
            out,
            "<li class=\"{}\">{} {}: <span style=\"font-weight:normal\">{}</span></li>",
            if check.passed { "pass" } else { "fail" },
            if check.passed { "✓" } else { "✗" },
            esc(&check.name),
            esc(&check.detail)
        );
    }
    out.push_str("</ul>\n");
    if step.paths.len() > 1 {
        out.push_str("<p>By path: ");
        let each: Vec<String> = step
            .paths
            .iter()
            .map(|p| {
                format!(
                    "{} RTO {}, {} of {} lost",
                    esc(&p.path),
                    p.rto_ms.map_or("none".to_string(), |ms| format!("{ms} ms")),
                    p.lost,
                    p.acknowledged
                )
            })
            .collect();
        out.push_str(&each.join("; "));
        out.push_str(".</p>\n");
    }
    for path in &step.paths {
        out.push_str(&writes_chart(step, path, &x));
        if !path.holders.is_empty() {
            out.push_str(&holders_chart(step, path, &x, end_ms));
        }
    }
    out.push_str(&bands_chart(step, &x, "leader (term at each change)", |s| {
        s.leader.map(|l| (format!("node {l}"), format!("t{}", s.term)))
    }));
    out.push_str(&bands_chart(step, &x, "region epoch (primary)", |s| {
        (s.epoch > 0).then(|| {
            let primary = s.primary.clone().unwrap_or_default();
            (format!("{} {primary}", s.epoch), format!("epoch {} {primary}", s.epoch))
        })
    }));
    out.push_str(&rto_chart(step, budget_ms));
    out
}

/// One path's writes per slice: acknowledged up, failed and unknown stacked above, with
/// the marks.
fn writes_chart(step: &Step, path: &PathFigures, x: &dyn Fn(u64) -> f64) -> String {
    let height = 160.0;
    let top = 20.0;
    let plot_h = height - top - 25.0;
    let most = path
        .writes
        .iter()
        .map(|b| b.acknowledged + b.failed + b.unknown)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let per_second = 1000.0 / BUCKET_MS as f64;
    let mut svg = format!(
        "<svg width=\"{WIDTH}\" height=\"{height}\" role=\"img\" aria-label=\"canary writes per second through {0}\"><text x=\"4\" y=\"14\">canary writes/s through {0} (max {1:.0}): acknowledged, failed, unknown</text>",
        esc(&path.path),
        most * per_second
    );
    let bar_w = (x(BUCKET_MS) - x(0)).max(1.0) - 0.5;
    for bucket in &path.writes {
        let mut y = top + plot_h;
        for (count, colour) in [
            (bucket.acknowledged, "#59a14f"),
            (bucket.failed, "#e15759"),
            (bucket.unknown, "#f28e2b"),
        ] {
            if count == 0 {
                continue;
            }
            let h = plot_h * count as f64 / most;
            y -= h;
            let _ = write!(
                svg,
                "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{bar_w:.1}\" height=\"{h:.1}\" fill=\"{colour}\"/>",
                x(bucket.at_ms)
            );
        }
    }
    svg.push_str(&marks_overlay(step, x, top, top + plot_h));
    let _ = writeln!(
        svg,
        "<text x=\"{LEFT}\" y=\"{:.0}\">0 s</text><text x=\"{:.0}\" y=\"{:.0}\" text-anchor=\"end\">{:.1} s</text></svg>",
        height - 5.0,
        LEFT + PLOT,
        height - 5.0,
        path.writes.len() as f64 * BUCKET_MS as f64 / 1000.0
    );
    svg
}

/// The service primary (instance and fencing token) that acknowledged the writes through
/// `path`, as one band: a new colour at each change.
fn holders_chart(step: &Step, path: &PathFigures, x: &dyn Fn(u64) -> f64, end_ms: u64) -> String {
    let (top, height) = (20.0, 48.0);
    let mut svg = format!(
        "<svg width=\"{WIDTH}\" height=\"{height:.0}\" role=\"img\" aria-label=\"service primary and token\"><text x=\"4\" y=\"14\">service primary (fencing token) acknowledging through {}</text>",
        esc(&path.path)
    );
    for (i, holder) in path.holders.iter().enumerate() {
        let until = path.holders.get(i + 1).map_or(end_ms, |h| h.at_ms);
        let _ = write!(
            svg,
            "<rect x=\"{:.1}\" y=\"{top:.0}\" width=\"{:.1}\" height=\"20\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.0}\" style=\"fill:#fff\">{} t{}</text>",
            x(holder.at_ms),
            (x(until) - x(holder.at_ms)).max(0.5),
            PALETTE[i % PALETTE.len()],
            x(holder.at_ms) + 2.0,
            top + 14.0,
            esc(&holder.instance),
            holder.token
        );
    }
    svg.push_str(&marks_overlay(step, x, top, top + 20.0));
    svg.push_str("</svg>\n");
    svg
}

/// One band per region, coloured by the value `pick` gives each sample (grey: none), its
/// label written where it changes.
fn bands_chart(
    step: &Step,
    x: &dyn Fn(u64) -> f64,
    title: &str,
    pick: impl Fn(&super::Sample) -> Option<(String, String)>,
) -> String {
    let mut regions: BTreeMap<&str, Vec<&super::Sample>> = BTreeMap::new();
    for sample in &step.samples {
        regions.entry(sample.region.as_str()).or_default().push(sample);
    }
    let row = 26.0;
    let top = 20.0;
    let height = top + row * regions.len().max(1) as f64 + 8.0;
    let mut colours: BTreeMap<String, &str> = BTreeMap::new();
    let mut svg = format!(
        "<svg width=\"{WIDTH}\" height=\"{height:.0}\" role=\"img\" aria-label=\"{}\"><text x=\"4\" y=\"14\">{}</text>",
        esc(title),
        esc(title)
    );
    for (i, (region, samples)) in regions.iter().enumerate() {
        let y = top + row * i as f64;
        let _ = write!(svg, "<text x=\"4\" y=\"{:.0}\">{}</text>", y + 16.0, esc(region));
        let mut last_label: Option<String> = None;
        for (j, sample) in samples.iter().enumerate() {
            let until = samples.get(j + 1).map_or(sample.at_ms + 250, |n| n.at_ms);
            let picked = pick(sample);
            let colour = match &picked {
                Some((key, _)) => {
                    let next = PALETTE[colours.len() % PALETTE.len()];
                    *colours.entry(key.clone()).or_insert(next)
                }
                None => "#ccc",
            };
            let _ = write!(
                svg,
                "<rect x=\"{:.1}\" y=\"{y:.0}\" width=\"{:.1}\" height=\"{:.0}\" fill=\"{colour}\"/>",
                x(sample.at_ms),
                (x(until) - x(sample.at_ms)).max(0.5),
                row - 6.0
            );
            let label = picked.map(|(_, label)| label);
            if label != last_label {
                if let Some(text) = &label {
                    let _ = write!(
                        svg,
                        "<text x=\"{:.1}\" y=\"{:.0}\" style=\"fill:#fff\">{}</text>",
                        x(sample.at_ms) + 2.0,
                        y + 14.0,
                        esc(text)
                    );
                }
                last_label = label;
            }
        }
    }
    svg.push_str(&marks_overlay(step, x, top, height - 8.0));
    svg.push_str("</svg>\n");
    svg
}

/// The step's marks as dashed vertical lines, labelled at the top.
fn marks_overlay(step: &Step, x: &dyn Fn(u64) -> f64, top: f64, bottom: f64) -> String {
    let mut svg = String::new();
    for mark in &step.marks {
        let at = x(mark.at_ms);
        let colour = if mark.label.starts_with("fault") {
            "#cf222e"
        } else {
            "#555"
        };
        let _ = write!(
            svg,
            "<line x1=\"{at:.1}\" y1=\"{top:.0}\" x2=\"{at:.1}\" y2=\"{bottom:.0}\" stroke=\"{colour}\" stroke-dasharray=\"4 3\"><title>{}</title></line>",
            esc(&mark.label)
        );
    }
    svg
}

/// The measured RTO against the budget, as two bars.
fn rto_chart(step: &Step, budget_ms: u64) -> String {
    let most = step.rto_ms.unwrap_or(budget_ms).max(budget_ms).max(1) as f64;
    let bar = |ms: u64| PLOT * ms as f64 / most;
    let mut svg = format!("<svg width=\"{WIDTH}\" height=\"64\" role=\"img\" aria-label=\"RTO against budget\">");
    let (measured, colour) = match step.rto_ms {
        Some(ms) if ms <= budget_ms => (ms, "#59a14f"),
        Some(ms) => (ms, "#e15759"),
        None => (budget_ms, "#e15759"),
    };
    let _ = write!(
        svg,
        "<text x=\"4\" y=\"20\">RTO</text><rect x=\"{LEFT}\" y=\"8\" width=\"{:.1}\" height=\"18\" fill=\"{colour}\"/><text x=\"{:.1}\" y=\"21\">{}</text>",
        bar(measured).max(1.0),
        LEFT + bar(measured).max(1.0) + 4.0,
        esc(&rto_text(step))
    );
    let _ = writeln!(
        svg,
        "<text x=\"4\" y=\"52\">budget</text><rect x=\"{LEFT}\" y=\"38\" width=\"{:.1}\" height=\"18\" fill=\"#bbb\"/><text x=\"{:.1}\" y=\"51\">{budget_ms} ms</text></svg>",
        bar(budget_ms).max(1.0),
        LEFT + bar(budget_ms).max(1.0) + 4.0
    );
    svg
}

/// One scenario over repeated drills.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScenarioSummary {
    pub scenario: Scenario,
    /// Steps of it that finished.
    pub runs: usize,
    /// RTO of each, ms (none: no recovery), in run order.
    pub rto_ms: Vec<Option<u64>>,
    pub rto_median_ms: Option<u64>,
    /// The slowest; none if any did not recover.
    pub rto_worst_ms: Option<u64>,
    /// Acknowledged writes lost in each.
    pub lost: Vec<usize>,
    pub lost_median: usize,
    pub lost_worst: usize,
    /// Steps that met their budgets and passed every check.
    pub passed: usize,
}

/// Each scenario's figures over `reports` (repeated runs of one drill), in the order the
/// scenarios first appear.
pub fn summarize(reports: &[Report]) -> Vec<ScenarioSummary> {
    let mut order: Vec<Scenario> = Vec::new();
    for step in reports.iter().flat_map(|r| &r.steps) {
        if !order.contains(&step.scenario) {
            order.push(step.scenario);
        }
    }
    order
        .into_iter()
        .map(|scenario| {
            let steps: Vec<&Step> = reports
                .iter()
                .flat_map(|r| &r.steps)
                .filter(|s| s.scenario == scenario)
                .collect();
            let rto_ms: Vec<Option<u64>> = steps.iter().map(|s| s.rto_ms).collect();
            let mut recovered: Vec<u64> = rto_ms.iter().flatten().copied().collect();
            recovered.sort_unstable();
            let lost: Vec<usize> = steps.iter().map(|s| s.lost).collect();
            let mut sorted_lost = lost.clone();
            sorted_lost.sort_unstable();
            ScenarioSummary {
                scenario,
                runs: steps.len(),
                rto_median_ms: median(&recovered),
                rto_worst_ms: if recovered.len() == rto_ms.len() {
                    recovered.last().copied()
                } else {
                    None
                },
                rto_ms,
                lost_median: median(&sorted_lost).unwrap_or(0),
                lost_worst: sorted_lost.last().copied().unwrap_or(0),
                lost,
                passed: steps
                    .iter()
                    .filter(|s| s.within_budget && s.checks.iter().all(|c| c.passed))
                    .count(),
            }
        })
        .collect()
}

/// The middle of `sorted` (the lower of the two middles of an even count).
fn median<T: Copy>(sorted: &[T]) -> Option<T> {
    sorted.get(sorted.len().saturating_sub(1) / 2).copied()
}

/// The summary as Markdown: one table, a row per scenario.
pub fn summary_markdown(summary: &[ScenarioSummary], repeat: usize) -> String {
    let ms = |v: Option<u64>| v.map_or("no recovery".to_string(), |ms| format!("{ms} ms"));
    let mut lines = vec![
        format!("# Rampart drill, {repeat} runs"),
        String::new(),
        "| scenario | runs | RTO median | RTO worst | RTO each run (ms) | lost median | lost worst | passed |"
            .to_string(),
        "|---|---|---|---|---|---|---|---|".to_string(),
    ];
    for s in summary {
        let each: Vec<String> = s
            .rto_ms
            .iter()
            .map(|r| r.map_or("-".to_string(), |ms| ms.to_string()))
            .collect();
        lines.push(format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} of {} |",
            s.scenario,
            s.runs,
            ms(s.rto_median_ms),
            ms(s.rto_worst_ms),
            each.join(", "),
            s.lost_median,
            s.lost_worst,
            s.passed,
            s.runs
        ));
    }
    lines.join("\n") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(scenario: Scenario, rto_ms: Option<u64>, lost: usize) -> Step {
        Step {
            scenario,
            injected_at_ms: 0,
            fault_at_ms: 0,
            fault: String::new(),
            budgets: super::super::Budgets {
                rto_ms: 5000,
                rpo_writes: 0,
            },
            rto_ms,
            acknowledged: 100,
            lost,
            reported_rpo: None,
            checks: Vec::new(),
            within_budget: rto_ms.is_some_and(|ms| ms <= 5000) && lost == 0,
            marks: Vec::new(),
            samples: Vec::new(),
            paths: Vec::new(),
        }
    }

    fn report(steps: Vec<Step>) -> Report {
        Report {
            started_ms: 0,
            scenarios: steps.iter().map(|s| s.scenario).collect(),
            budgets: steps[0].budgets,
            steps,
            passed: true,
            aborted: None,
        }
    }

    #[test]
    fn a_summary_gives_each_scenarios_median_and_worst_and_no_worst_when_a_run_did_not_recover() {
        let reports = vec![
            report(vec![
                step(Scenario::LeaderKill, Some(300), 0),
                step(Scenario::LinkCut, Some(5), 0),
            ]),
            report(vec![
                step(Scenario::LeaderKill, Some(100), 0),
                step(Scenario::LinkCut, None, 2),
            ]),
            report(vec![step(Scenario::LeaderKill, Some(200), 1)]),
        ];
        let summary = summarize(&reports);
        assert_eq!(summary.len(), 2);
        let kill = &summary[0];
        assert_eq!(kill.scenario, Scenario::LeaderKill);
        assert_eq!(
            (kill.runs, kill.rto_median_ms, kill.rto_worst_ms),
            (3, Some(200), Some(300))
        );
        assert_eq!((kill.lost_median, kill.lost_worst, kill.passed), (0, 1, 2));
        let cut = &summary[1];
        assert_eq!(
            (cut.rto_median_ms, cut.rto_worst_ms, cut.lost_worst),
            (Some(5), None, 2)
        );
        let text = summary_markdown(&summary, 3);
        assert!(
            text.contains("| leader-kill | 3 | 200 ms | 300 ms | 300, 100, 200 | 0 | 1 | 2 of 3 |"),
            "{text}"
        );
        assert!(text.contains("| link-cut | 2 | 5 ms | no recovery | 5, - |"), "{text}");
    }
}
