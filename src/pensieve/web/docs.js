// Renders /openapi.json as a list of operations with their request schemas, without any CDN.
(function () {
  "use strict";
  var box = document.getElementById("operations");

  function resolve(schema, spec) {
    if (schema && schema.$ref) {
      var name = schema.$ref.split("/").pop();
      return spec.components.schemas[name] || schema;
    }
    return schema;
  }

  function typeName(schema, spec) {
    if (!schema) return "any";
    if (schema.$ref) return schema.$ref.split("/").pop();
    if (schema.anyOf) {
      return schema.anyOf.filter(function (s) { return s.type !== "null"; })
        .map(function (s) { return typeName(s, spec); }).join(" or ");
    }
    if (schema.type === "array") return "array of " + typeName(schema.items, spec);
    if (schema.enum) return schema.enum.map(JSON.stringify).join(" | ");
    return schema.type || "object";
  }

  function bounds(schema) {
    var parts = [];
    (schema.anyOf || [schema]).forEach(function (s) {
      if (s.minimum !== undefined) parts.push("\u2265 " + s.minimum);
      if (s.exclusiveMinimum !== undefined) parts.push("> " + s.exclusiveMinimum);
      if (s.maximum !== undefined) parts.push("\u2264 " + s.maximum);
      if (s.maxItems !== undefined) parts.push("at most " + s.maxItems + " items");
    });
    return parts.join(", ");
  }

  function cell(row, text, tag) {
    var el = document.createElement(tag || "td");
    el.textContent = text; row.append(el);
  }

  function fieldsTable(schema, spec) {
    var table = document.createElement("table"), head = document.createElement("tr");
    ["field", "type", "range", "default"].forEach(function (h) { cell(head, h, "th"); });
    table.append(head);
    var required = schema.required || [];
    Object.keys(schema.properties || {}).forEach(function (name) {
      var prop = schema.properties[name], row = document.createElement("tr");
      cell(row, name + (required.indexOf(name) >= 0 ? " (required)" : ""));
      cell(row, typeName(prop, spec));
      cell(row, bounds(prop));
      cell(row, prop.default === undefined ? "" : JSON.stringify(prop.default));
      table.append(row);
    });
    return table;
  }

  function operation(path, method, op, spec) {
    var details = document.createElement("details"), summary = document.createElement("summary");
    var verb = document.createElement("span");
    details.className = "op";
    verb.className = "method"; verb.textContent = method.toUpperCase();
    summary.append(verb, " " + path + (op.summary ? "  \u2014 " + op.summary : ""));
    details.append(summary);
    var content = op.requestBody && op.requestBody.content;
    var json = content && content["application/json"];
    var params = (op.parameters || []).map(function (p) { return p.name + " (" + p.in + ")"; });
    if (params.length) {
      var p = document.createElement("p");
      p.textContent = "Parameters: " + params.join(", ");
      details.append(p);
    }
    if (json) details.append(fieldsTable(resolve(json.schema, spec), spec));
    else if (!params.length) {
      var none = document.createElement("p");
      none.textContent = "No parameters.";
      details.append(none);
    }
    return details;
  }

  fetch("/openapi.json").then(function (r) { return r.json(); }).then(function (spec) {
    box.textContent = "";
    Object.keys(spec.paths).sort().forEach(function (path) {
      Object.keys(spec.paths[path]).forEach(function (method) {
        box.append(operation(path, method, spec.paths[path][method], spec));
      });
    });
  }).catch(function (e) { box.textContent = "Cannot load /openapi.json: " + e.message; });
})();
