//! The ceiling the DynamoDB benches compare against: one conditional `UpdateItem` with
//! `ADD`, the write the limiter's hot path is made of, minus everything a limiter adds.

use zae_limiter::repository::dynamodb::aws_sdk_dynamodb::types::AttributeValue;
use zae_limiter::DynamoDbRepository;

/// Takes one `rpm` token from the bucket item of `entity` and `resource`.
pub async fn update_item(repo: &DynamoDbRepository, entity: &str, resource: &str) {
    repo.client()
        .update_item()
        .table_name(repo.table())
        .key(
            "PK",
            AttributeValue::S(format!(
                "{}/BUCKET#{entity}#{resource}#0",
                repo.namespace_id()
            )),
        )
        .key("SK", AttributeValue::S("#STATE".into()))
        .update_expression("ADD #tk :minus, #tc :plus")
        .condition_expression("attribute_exists(PK) AND #tk >= :plus")
        .expression_attribute_names("#tk", "b_rpm_tk")
        .expression_attribute_names("#tc", "b_rpm_tc")
        .expression_attribute_values(":minus", AttributeValue::N("-1000".into()))
        .expression_attribute_values(":plus", AttributeValue::N("1000".into()))
        .send()
        .await
        .expect("raw UpdateItem");
}
